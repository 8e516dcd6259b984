"""Base-model fine-tuning: Ray Train workers, each wrapping the UNet (and text encoder) in DeepSpeed ZeRO."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import checkpoint, engine, models, sr
from .images import load_subject_images
from .priors import PriorCache
from .spec import JobSpec, Subject, TrainConfig
from .storage import Storage

log = logging.getLogger("dreambooth_ray")


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    spec: JobSpec = config["spec"]
    subject: Subject = config["subject"]
    stage = config.get("stage", "base")
    cfg = stage_config(spec, stage)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    instance = [s.image for s in load_subject_images(subject.images, cfg.resolution, spec.s3, spec.skip_bad_images)]
    classes = []
    if config["prior_key"]:  # class images at this stage's resolution
        classes = PriorCache(Storage(spec.storage, spec.s3), config["prior_key"], subject.class_text,
                             cfg.resolution, spec.prior).load(spec.prior.num_class_images)
    if stage == "sr":
        eng = sr.build(models.load_sr_components(spec.sr.model, spec.s3), instance, classes, subject.instance_text,
                       subject.class_text, cfg, spec.sr, spec.sr.input_resolution or spec.train.resolution, device)
    else:
        eng = engine.build(models.load_components(spec.model, spec.s3), instance, classes, subject.instance_text,
                           subject.class_text, cfg, spec.prior.loss_weight, device)
    lora = cfg.method == "lora"
    tag = subject.name if stage == "base" else f"{subject.name} {stage}"
    start = checkpoint.restore(eng.ds, lora)
    if start and rank == 0:
        print(f"[{tag}] resumed from checkpoint at step {start}", flush=True)

    run_root = config["run_root"]  # (path, pyarrow filesystem) of this run's checkpoints
    t0, last = time.perf_counter(), start
    for step in range(start, cfg.steps):
        sums = eng.step(step, rank)
        torch.distributed.all_reduce(sums)  # report the mean over all ranks, not rank 0's sample
        sums /= ctx.get_world_size()
        done = step + 1
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": done, "loss": sums[0].item(), "instance_loss": sums[1].item(), "prior_loss": sums[2].item(),
            "lr": eng.lr(), "steps_per_s": (done - last) / max(elapsed, 1e-9),
            "node_id": ray.get_runtime_context().get_node_id(),  # rank 0's node: where the run was placed
        }
        if rank == 0:
            print(f"[{tag}] step {done}/{cfg.steps} loss {metrics['loss']:.4f} "
                  f"(subject {metrics['instance_loss']:.4f}, prior {metrics['prior_loss']:.4f}) "
                  f"lr {metrics['lr']:.2e} {metrics['steps_per_s']:.2f} steps/s", flush=True)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint.save(eng.ds, done, metrics, started_at=start, run_root=run_root, lora=lora)
            _maybe_inject_fault(config.get("fault"), done, start, rank)
        else:
            ray.train.report(metrics)


def _maybe_inject_fault(fault: tuple[str, int] | None, step: int, start: int, rank: int) -> None:
    """Test hook, first attempt only: ("raise", N) fails every rank after step N's checkpoint;
    ("kill", N) SIGKILLs rank 0's process, a real worker death for Ray's FailureConfig to handle."""
    if not fault or fault[1] != step or start != 0:
        return
    how = fault[0]
    if how == "raise":
        raise RuntimeError(f"injected failure after step {step} (test hook)")
    if how == "kill" and rank == 0:
        import os
        import signal

        time.sleep(3)  # let the controller register the reported checkpoint first
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainResult:
    checkpoint: ray.train.Checkpoint  # the last one, in the storage filesystem
    metrics: dict


def stage_config(spec: JobSpec, stage: str) -> TrainConfig:
    return spec.train if stage == "base" else spec.sr.train_config(spec.train)


def fit(spec: JobSpec, subject: Subject, storage: Storage, run_name: str, prior_key: str | None,
        use_gpu: bool, fault: tuple[str, int] | None = None, stage: str = "base") -> TrainResult:
    """Run (or resume) one subject's training stage ('base' or 'sr'). Same `run_name` + storage =
    resume from the last checkpoint."""
    storage_path, storage_fs = storage.ray_storage("checkpoints", spec.name)
    cfg = stage_config(spec, stage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "subject": subject, "prior_key": prior_key, "fault": fault, "stage": stage,
                           "run_root": (f"{storage_path}/{run_name}", storage_fs)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"training of {subject.name!r} finished without a checkpoint")
    return TrainResult(ckpt, dict(result.metrics or {}))
