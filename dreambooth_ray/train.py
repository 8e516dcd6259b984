"""Base-model fine-tuning: Ray Train workers, each wrapping the UNet (and text encoder) in DeepSpeed ZeRO."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from . import checkpoint, models
from .data import DreamBoothData, step_generator
from .images import load_subject_images
from .loss import diffusion_target, prior_preservation_loss
from .priors import PriorCache
from .spec import JobSpec, Subject, TrainConfig
from .storage import Storage

log = logging.getLogger("dreambooth_ray")


class DreamBoothModel(torch.nn.Module):
    """What DeepSpeed trains: the UNet, and the text encoder when it is trained too."""

    def __init__(self, unet, text_encoder=None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy_latents, timesteps, input_ids=None, encoder_hidden_states=None):
        if self.text_encoder is not None:
            encoder_hidden_states = self.text_encoder(input_ids)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states).sample


def add_lora(unet, text_encoder, cfg: TrainConfig) -> None:
    """Freeze the base weights and add trainable low-rank adapters (peft), as diffusers' LoRA scripts do."""
    from peft import LoraConfig

    lc = cfg.lora
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, init_lora_weights="gaussian",
                                target_modules=list(lc.target_modules)))
    if lc.text_encoder:
        text_encoder.requires_grad_(False)
        text_encoder.add_adapter(LoraConfig(r=lc.rank, lora_alpha=lc.alpha, init_lora_weights="gaussian",
                                            target_modules=list(lc.text_encoder_modules)))


def deepspeed_config(cfg: TrainConfig) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.mixed_precision == "bf16"},
        "fp16": {"enabled": cfg.mixed_precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: fused/foreach kernels, works under ZeRO
        "steps_per_print": 1 << 30,
    }


def diffusion_step(model, vae, noise_scheduler, pixels, n_instance, g, prior_weight, dtype, device, **text):
    """One noise-prediction forward pass over [subject rows; class rows] and the DreamBooth loss."""
    with torch.no_grad():
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=g).to(device, dist.mean.dtype)
        latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = diffusion_target(noise_scheduler, latents, noise, t)
    pred = model(noisy.to(dtype), t, **text)
    return prior_preservation_loss(pred, target, n_instance, prior_weight)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import deepspeed

    spec: JobSpec = config["spec"]
    subject: Subject = config["subject"]
    cfg = spec.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    torch.manual_seed(cfg.seed)

    parts = models.load_components(spec.model, spec.s3)
    tok, te, vae = parts["tokenizer"], parts["text_encoder"], parts["vae"]
    noise_scheduler = parts["noise_scheduler"]
    vae.requires_grad_(False).to(device, torch.float32 if dtype == torch.float16 else dtype)
    instance = [s.image for s in load_subject_images(subject.images, cfg.resolution, spec.s3, spec.skip_bad_images)]
    classes = []
    if spec.prior.enabled:
        classes = PriorCache(Storage(spec.storage, spec.s3), config["prior_key"], subject.class_text,
                             cfg.resolution, spec.prior).load(spec.prior.num_class_images)
    data = DreamBoothData(instance, classes, cfg.random_flip)

    def ids(prompt: str) -> torch.Tensor:
        return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    prompt_ids = torch.cat([ids(subject.instance_text)] * cfg.batch_size
                           + ([ids(subject.class_text)] * cfg.batch_size if data.with_prior else []))
    lora = cfg.method == "lora"
    if lora:
        add_lora(parts["unet"], te, cfg)
    if cfg.train_text_encoder or (lora and cfg.lora.text_encoder):
        model = DreamBoothModel(parts["unet"], te)
        text = {"input_ids": prompt_ids.to(device)}
    else:
        # Frozen text encoder: the two prompts' embeddings never change, so compute them once.
        te.requires_grad_(False).to(device)
        with torch.no_grad():
            text = {"encoder_hidden_states": te(prompt_ids.to(device))[0].to(dtype)}
        del te
        model = DreamBoothModel(parts["unet"])

    params = [p for p in model.parameters() if p.requires_grad]
    on_gpu = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2, **({"fused": True} if on_gpu else {"foreach": True}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.lr_warmup_steps + 1)))
    engine, _, _, lr_sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                  config=deepspeed_config(cfg))
    start = checkpoint.restore(engine, lora)
    if start and rank == 0:
        print(f"[{subject.name}] resumed from checkpoint at step {start}", flush=True)

    run_root = config["run_root"]  # (path, pyarrow filesystem) of this run's checkpoints
    t0, last = time.perf_counter(), start
    for step in range(start, cfg.steps):
        sums = torch.zeros(3)
        for micro in range(cfg.gradient_accumulation):
            g = step_generator(cfg.seed, step, micro, rank)
            pixels, n_inst = data.batch(cfg.batch_size, g)
            loss, inst, prior = diffusion_step(engine, vae, noise_scheduler, pixels, n_inst, g,
                                               spec.prior.loss_weight, dtype, device, **text)
            engine.backward(loss)
            engine.step()
            sums += torch.stack([loss.detach().float().cpu(), inst.float().cpu(), prior.float().cpu()])
        sums /= cfg.gradient_accumulation
        torch.distributed.all_reduce(sums)  # report the mean over all ranks, not rank 0's sample
        sums /= ctx.get_world_size()
        done = step + 1
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": done, "loss": sums[0].item(), "instance_loss": sums[1].item(), "prior_loss": sums[2].item(),
            "lr": lr_sched.get_last_lr()[0], "steps_per_s": (done - last) / max(elapsed, 1e-9),
            "node_id": ray.get_runtime_context().get_node_id(),  # rank 0's node: where the run was placed
        }
        if rank == 0:
            print(f"[{subject.name}] step {done}/{cfg.steps} loss {metrics['loss']:.4f} "
                  f"(subject {metrics['instance_loss']:.4f}, prior {metrics['prior_loss']:.4f}) "
                  f"lr {metrics['lr']:.2e} {metrics['steps_per_s']:.2f} steps/s", flush=True)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            checkpoint.save(engine, done, metrics, started_at=start, run_root=run_root, lora=lora)
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


def fit(spec: JobSpec, subject: Subject, storage: Storage, run_name: str, prior_key: str | None,
        use_gpu: bool, fault: tuple[str, int] | None = None) -> TrainResult:
    """Run (or resume) one subject's training. Same `run_name` + storage = resume from the last checkpoint."""
    storage_path, storage_fs = storage.ray_storage("checkpoints", spec.name)
    cfg = spec.train
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "subject": subject, "prior_key": prior_key, "fault": fault,
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
