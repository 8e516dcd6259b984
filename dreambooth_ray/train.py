"""Base-model fine-tuning: Ray Train workers, each wrapping the UNet (and text encoder) in DeepSpeed ZeRO."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from . import checkpoint, engine, export, models, samples, sr
from .images import load_subject_images
from .priors import PriorCache
from .spec import JobSpec, Subject, TrainConfig
from .storage import Storage
from .storage import io_counts as storage_io_counts

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
    # Where this attempt's time goes (rank 0's view), for the job's per-subject timeline.
    timeline = {"worker_started_at": time.time(), "checkpoint_stalls": 0.0, "validation_handover": 0.0}
    io_start = storage_io_counts()
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        timeline[name] = timeline.get(name, 0.0) + now - mark
        mark = now

    photos = load_subject_images(subject.images, cfg.resolution, spec.s3, spec.skip_bad_images)
    instance = [s.image for s in photos]
    classes = []
    if config["prior_key"]:  # class images at this stage's resolution
        classes = PriorCache(Storage(spec.storage, spec.s3), config["prior_key"], subject.class_text,
                             cfg.resolution, spec.prior).load(spec.prior.num_class_images)
    phase("photos_and_class_images")
    parts = (models.load_sr_components(spec.sr.model, spec.s3) if stage == "sr"
             else models.load_components(spec.model, spec.s3, engine.partitioned_loader(cfg)))
    phase("model_load")
    if stage == "sr":
        eng = sr.build(parts, instance, classes, subject.instance_text,
                       subject.class_text, cfg, spec.sr, spec.sr.input_resolution or spec.train.resolution, device)
    else:
        eng = engine.build(parts, instance, classes, subject.instance_text,
                           subject.class_text, cfg, spec.prior.loss_weight, device,
                           geometry=[s.geometry for s in photos])
    lora = cfg.method == "lora"
    tag = subject.name if stage == "base" else f"{subject.name} {stage}"
    phase("latent_cache_and_engine")  # VAE latents, frozen text embeddings, DeepSpeed set-up
    start = checkpoint.restore(eng.ds, lora)
    phase("restore")
    reporter = config.get("reporter")
    if start and rank == 0:
        print(f"[{tag}] resumed from checkpoint at step {start}", flush=True)
        if reporter:
            reporter.say(f"resumed from checkpoint at step {start}")

    run_root = config["run_root"]  # (path, pyarrow filesystem) of this run's checkpoints
    validator, handovers = config.get("validator"), []
    history = History(spec, subject, config["run_name"], stage) if rank == 0 else None
    t0, last = time.perf_counter(), start
    for step in range(start, cfg.steps):
        mark = time.perf_counter()
        sums = eng.step(step, rank)  # on the training device: NCCL reduces no CPU tensors
        torch.distributed.all_reduce(sums)  # report the mean over all ranks, not rank 0's sample
        sums /= ctx.get_world_size()
        done = step + 1
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": done, "loss": sums[0].item(), "instance_loss": sums[1].item(), "prior_loss": sums[2].item(),
            "lr": eng.lr(), "steps_per_s": (done - last) / max(elapsed, 1e-9),
            "node_id": ray.get_runtime_context().get_node_id(),  # rank 0's node: where the run was placed
        }
        phase("steps")
        if rank == 0:
            history.add(metrics)
            if reporter:
                reporter.progress(done, cfg.steps, metrics["loss"])
            print(f"[{tag}] step {done}/{cfg.steps} loss {metrics['loss']:.4f} "
                  f"(subject {metrics['instance_loss']:.4f}, prior {metrics['prior_loss']:.4f}) "
                  f"lr {metrics['lr']:.2e} {metrics['steps_per_s']:.2f} steps/s", flush=True)
        if validator is not None and done % spec.samples.validation_every == 0:
            # Every rank gathers (ZeRO-3: a collective); rank 0 puts a CPU copy in the object store and goes
            # on. The copy is this process's object: it must outlive the hand-over (see below).
            sd = export.live_state_dict(eng.ds, cfg, rank)
            if rank == 0:
                handovers.append(validator.receive.remote(done, samples.to_wire(sd)))
            phase("validation_handover")
        # Ray Train hears of the run at checkpoints only: each report waits for the controller's poll
        # (~2 s), which would throttle every step; every rank reports, as Ray requires.
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            # The stall: what training waits for (the local write; with async uploads, not the upload).
            metrics["timeline"] = {k: round(v, 3) for k, v in timeline.items()}
            checkpoint.save(eng.ds, done, metrics, started_at=start, run_root=run_root, lora=lora,
                            upload=cfg.checkpoint_upload)
            phase("checkpoint_stalls")
            if rank == 0:
                history.flush()
            _maybe_inject_fault(config.get("fault"), done, start, rank)
    ray.get(handovers)  # the validator holds every copy of the weights before this process may end
    # Bytes this attempt's workers moved (photos and class images read, checkpoint shards written and
    # read back), summed over the ranks: a collective every rank reaches here.
    io = torch.tensor([now - then for now, then in zip(storage_io_counts(), io_start)], dtype=torch.float64,
                      device=eng.ds.device)
    torch.distributed.all_reduce(io)
    timeline["bytes_written"], timeline["bytes_read"] = (int(v) for v in io.tolist())
    if config.get("export_to"):  # also after a resume at the last step: a failed export is redone
        # The whole attempt's timeline (the last checkpoint's stall included) travels with the export.
        record = export.from_engine(eng.ds, spec, Storage(spec.storage, spec.s3), *config["export_to"], rank,
                                    timeline={k: round(v, 3) for k, v in timeline.items()})
        if record:
            print(f"[{tag}] exported {record['model']} ({record['dtype']}, {record['seconds']:.1f} s)", flush=True)


class History:
    """Rank 0's per-step metrics: TensorBoard event files under outputs/<job>/tensorboard/<subject>/, and JSON
    chunks, one per span of steps (outputs/<job>/<subject>/history/<run>/steps-<first>-<last>.json), both
    written to storage at each checkpoint. A resumed attempt rewrites the steps after its checkpoint, and
    `read` keeps the newest value of each step. The report's loss curves come from the chunks."""

    KEYS = ("loss", "instance_loss", "prior_loss", "lr", "steps_per_s")

    def __init__(self, spec: JobSpec, subject: Subject, run: str, stage: str = "base"):
        self.storage = Storage(spec.storage, spec.s3)
        self.folder = ("outputs", spec.name, subject.name, "history", run)
        self.tensorboard = tensorboard_folder(spec, subject)
        self.rows: list[dict] = []
        self.tag = "train" if stage == "base" else stage

    def add(self, metrics: dict) -> None:
        self.rows.append({"step": metrics["step"], "time": time.time(), **{k: metrics[k] for k in self.KEYS}})

    def flush(self) -> None:
        if self.rows:
            first, last = self.rows[0]["step"], self.rows[-1]["step"]
            self.storage.write_json({"steps": self.rows}, *self.folder, f"steps-{first:07d}-{last:07d}.json")
            with tensorboard_events(self.storage, self.tensorboard) as tb:
                for row in self.rows:
                    for k in self.KEYS:
                        tb.add_scalar(f"{self.tag}/{k}", row[k], row["step"])
            self.rows = []

    @staticmethod
    def read(storage: Storage, *folder: str) -> list[dict]:
        by_step: dict[int, dict] = {}
        chunks = [storage.read_json(*folder, name) or {} for name in sorted(storage.listdir(*folder))]
        for chunk in sorted(chunks, key=lambda c: c.get("steps", [{}])[0].get("time", 0)):
            for row in chunk.get("steps", []):
                by_step[row["step"]] = row  # written later: a resumed attempt's
        return [by_step[k] for k in sorted(by_step)]


def tensorboard_folder(spec: JobSpec, subject: Subject) -> tuple[str, ...]:
    """One TensorBoard run per subject: `tensorboard --logdir <storage>/outputs/<job>/tensorboard`."""
    return ("outputs", spec.name, "tensorboard", subject.name)


@contextlib.contextmanager
def tensorboard_events(storage: Storage, folder: tuple[str, ...]):
    """A TensorBoard writer whose event file goes to storage, complete, when the block ends. One file per
    block: tensorboardX writes from a background queue that `flush` does not drain, `close` does."""
    import os
    import tempfile
    import uuid

    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory(prefix="dbr-tb-") as local:
        writer = SummaryWriter(local, filename_suffix=f".{uuid.uuid4().hex[:8]}")
        try:
            yield writer
        finally:
            writer.close()
        for name in os.listdir(local):
            with open(os.path.join(local, name), "rb") as f:
                storage.write_bytes(f.read(), *folder, name)


def _maybe_inject_fault(fault: tuple[str, int] | None, step: int, start: int, rank: int) -> None:
    """Test hook (fit passes it to the first attempt only): ("raise", N) fails every rank after step N's checkpoint;
    ("kill", N) SIGKILLs rank 0's process once that checkpoint is uploaded and registered, a real
    worker death; ("kill-uploading", N) SIGKILLs it while the checkpoint is still uploading."""
    if not fault or fault[1] != step:
        return
    how = fault[0]
    if how == "raise":
        raise RuntimeError(f"injected failure after step {step} (test hook)")
    if how.startswith("kill") and rank == 0:
        import os
        import signal

        if how == "kill":
            checkpoint.uploaded(f"step-{step:07d}").wait(120)
            time.sleep(3)  # let the controller register the reported checkpoint first
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainResult:
    checkpoint: ray.train.Checkpoint  # the last one, in the storage filesystem
    metrics: dict


def stage_config(spec: JobSpec, stage: str) -> TrainConfig:
    return spec.train if stage == "base" else spec.sr.train_config(spec.train)


def fit(spec: JobSpec, subject: Subject, storage: Storage, run_name: str, prior_key: str | None,
        use_gpu: bool, fault: tuple[str, int] | None = None, stage: str = "base",
        export_to: tuple[tuple[str, ...], str] | None = None, reporter=None, validator=None) -> TrainResult:
    """Run (or resume) one subject's training stage ('base' or 'sr'). Same `run_name` + storage =
    resume from the last checkpoint.

    Retries are ours, not Ray's FailureConfig: a re-run of the same run resumes from its last
    checkpoint, but only failures that can pass (a dead worker or node, an I/O or communication
    error) are retried. An error that recurs every time (a TypeError from a model the code cannot
    drive, a bad setting) fails at once, under its own name, instead of reloading the model
    `max_failures` more times and ending as "Training failed due to worker errors"."""
    storage_path, storage_fs = storage.ray_storage("checkpoints", spec.name)
    cfg = stage_config(spec, stage)
    trainer = lambda attempt: TorchTrainer(  # noqa: E731  (a fresh trainer per attempt, same run)
        train_loop,
        train_loop_config={"spec": spec, "subject": subject, "prior_key": prior_key, "stage": stage,
                           "fault": fault if attempt == 0 else None, "export_to": export_to, "reporter": reporter,
                           "validator": validator,
                           "run_root": (f"{storage_path}/{run_name}", storage_fs), "run_name": run_name},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        # On GPUs, NCCL for CUDA tensors and gloo for any CPU tensor a collective meets: Ray's
        # default there is NCCL alone, which cannot reduce a CPU tensor.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    for attempt in range(cfg.max_failures + 1):
        try:
            result = trainer(attempt).fit()
            break
        except Exception as e:
            cause = worker_error(e)
            if attempt == cfg.max_failures or not retryable(cause):
                raise TrainingError(describe(cause)) from None
            msg = f"attempt {attempt + 1} failed ({describe(cause)}); resuming from the last checkpoint"
            reporter.say(msg) if reporter else log.warning("%s: %s", run_name, msg)
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"training of {subject.name!r} finished without a checkpoint")
    return TrainResult(ckpt, dict(result.metrics or {}))


class TrainingError(RuntimeError):
    """Training failed; the message is the underlying exception's type and first line."""


# Errors of the program or its input: the same code on the same model and settings raises them again.
_RECURRING = (TypeError, ValueError, KeyError, AttributeError, IndexError, NameError, ImportError,
              NotImplementedError, AssertionError, ZeroDivisionError)


def worker_error(e: BaseException) -> BaseException:
    """The exception that a training worker raised (rank 0's when several did), unwrapped from Ray's."""
    failures = getattr(e, "worker_failures", None)
    if failures:
        e = failures[min(failures)]
    while isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None and e.cause is not e:
        e = e.cause
    return e


def retryable(e: BaseException) -> bool:
    from .errors import UserError

    if isinstance(e, ray.exceptions.RayActorError):  # a dead worker process or node
        return True
    return not isinstance(e, _RECURRING + (UserError,))


def describe(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
