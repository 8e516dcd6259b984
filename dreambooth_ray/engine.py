"""What a training worker runs, without Ray: the trained module, its DeepSpeed config, and one step.

Kept free of Ray so that `bench.py` times exactly this code against the reference recipe.
The speed-ups live here, each behind a `train.*` switch that the benchmark turns on and off:
VAE latents cached once (both flip variants), SDPA attention, channels_last, torch.compile.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from . import snapshot
from .data import DreamBoothData, step_generator
from .loss import prior_preservation_loss
from .spec import TrainConfig


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype DeepSpeed keeps the trained weights in (and feeds the model)."""
    return {"bf16-weights": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else None


def frozen_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype frozen weights are kept in, as diffusers casts its frozen parts to the weight dtype:
    bf16 in the bf16 modes (under autocast an fp32 frozen weight is cast again at every use, and each
    bf16 copy stays alive until backward). fp32 otherwise: fp16 overflows T5, and DeepSpeed's fp16
    engine casts what it trains itself."""
    return torch.bfloat16 if cfg.mixed_precision in ("bf16", "bf16-weights") else torch.float32


def freeze_to(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a module's frozen parameters (LoRA's base) to `dtype`; its trainable ones (the adapters)
    keep their fp32 master copy."""
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


@contextmanager
def fp32_view(module: torch.nn.Module):
    """The module's 16-bit parameters shown as fp32 (their storage set aside) for the duration: peft
    makes each adapter in its base layer's dtype, and would round the adapters' fp32 init to a base
    loaded in bf16 (partitioned_loader); over this view they are made as over today's fp32 base."""
    kept = [(p, p.data) for p in module.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    for p, _ in kept:
        p.data = torch.empty(0, device=p.device)
    try:
        yield
    finally:
        for p, data in kept:
            p.data = data


class DreamBoothModel(torch.nn.Module):
    """What DeepSpeed trains: the denoiser (a UNet or a transformer), and the text encoder(s) when they
    are trained too. The family (families/) runs them: `forward(noisy, t, **conditioning)` is
    `family.denoise`. Parts keep their pipeline names (unet or transformer, text_encoder, ...), so
    checkpoint keys name them."""

    def __init__(self, denoiser, text_encoder=None, family=None, **more_text_encoders):
        super().__init__()
        from .families import SD

        self.family = family or SD
        self.add_module(self.family.denoiser, denoiser)
        self.text_encoder = text_encoder
        for name, module in more_text_encoders.items():
            self.add_module(name, module)

    def forward(self, noisy_latents, timesteps, **conditioning):
        # With a trained encoder the mask is given as in inference: T5 (IF) reads it, CLIP gets None.
        return self.family.denoise(self, noisy_latents, timesteps, **conditioning)


def add_lora(unet, text_encoder, cfg: TrainConfig, family=None, **more_text_encoders) -> None:
    """Freeze the base weights and add trainable low-rank adapters (peft), as diffusers' LoRA scripts do."""
    from .families import SD

    (family or SD).add_lora({"unet": unet, "text_encoder": text_encoder, **more_text_encoders}, cfg)


def configure_denoiser(denoiser, cfg: TrainConfig, family) -> None:
    """Attention kernel, memory layout and checkpointing: settings that change speed and memory, not
    what is computed."""
    family.set_attention(denoiser, classic=cfg.attention == "classic")
    if cfg.gradient_checkpointing:  # non-reentrant torch.utils.checkpoint, RNG state kept for the recompute
        denoiser.enable_gradient_checkpointing()
    # channels_last is set on the step's input, not the weights: DeepSpeed broadcasts and flattens
    # parameters as contiguous buffers, and a conv with a channels_last input runs channels_last.
    if cfg.compile:
        denoiser.compile()  # in place: parameter names (and so checkpoints) stay those of the plain UNet


def deepspeed_config(cfg: TrainConfig) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    pin = torch.cuda.is_available()  # page-locked host buffers: faster copies to and from a GPU
    if cfg.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        # bf16 weights and activations, fp32 master weights in the optimizer (DeepSpeed's BF16 path).
        "bf16": {"enabled": cfg.mixed_precision == "bf16-weights"},
        "fp16": {"enabled": cfg.mixed_precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: fused/foreach kernels, works under ZeRO
        "steps_per_print": 1 << 30,
    }


def no_shm_comm() -> None:
    """DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference that training never calls:
    30-60 s on first use, and a compile killed midway leaves a lock that hangs every later run."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def partitioned_loader(cfg: TrainConfig):
    """The denoiser's loader (None: from_pretrained). Under ZeRO-3 it builds the denoiser already
    sharded, so no worker ever holds all of it (a 12B Flux transformer is 48 GB in fp32). LoRA's
    frozen base is loaded in the dtype it trains in (bf16 under `mixed_precision: bf16`), never as an
    fp32 copy: sharded under ZeRO-3, whole otherwise."""
    dtype = torch.bfloat16 if cfg.method == "lora" and cfg.mixed_precision == "bf16" else None  # freeze_to's cast, at load
    if cfg.zero_stage == 3:
        return lambda cls, path, subfolder: load_partitioned(cls, path, subfolder, deepspeed_config(cfg), dtype=dtype)
    if dtype is not None:
        return lambda cls, path, subfolder: load_whole(cls, path, subfolder, dtype)
    return None


def load_whole(cls, path: str, subfolder: str, dtype: torch.dtype):
    """A diffusers model with its parameters read straight into `dtype`, one tensor at a time (peak: the
    model in `dtype` plus its largest tensor in the file's dtype). Buffers stay as the constructor makes them
    (from_pretrained(torch_dtype=...) would cast those too, e.g. SD3's positional table)."""
    from accelerate import init_empty_weights
    from safetensors import safe_open

    folder = _local_folder(path, subfolder)
    where = weight_files(folder)
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers real
        model = cls.from_config(cls.load_config(str(folder))).eval()
    named = dict(model.named_parameters())
    missing = [n for n in named if n not in where]
    if missing:
        raise KeyError(f"{folder}: no weights for {missing[:3]} ({len(missing)} parameters)")
    buffers = dict(model.named_buffers())
    for name, file in where.items():
        # The file opened (memory-mapped) per tensor: kept open, each page read stays mapped in this
        # process, and its peak RSS would hold the whole file beside the converted model.
        with safe_open(str(file), "pt") as sf:
            if name in named:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(sf.get_tensor(name).to(dtype))
            elif name in buffers:
                buffers[name].copy_(sf.get_tensor(name))
    return model


def load_partitioned(cls, path: str, subfolder: str, ds_config: dict, chunk: int = 1 << 24,
                     dtype: torch.dtype | None = None):
    """A diffusers model built under deepspeed.zero.Init (each rank allocates only its shard), then
    filled from its safetensors files: rank 0 reads up to `chunk` elements at a time (memory-mapped)
    into parameters gathered for that moment, and the shards are scattered back. Peak host memory per
    worker: its shard plus one chunk, falling with the worker count. `dtype`: the parameters' (a frozen
    base's: made in it, each chunk cast as it is read); default the config's."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    if not torch.cuda.is_available():
        no_shm_comm()
    folder = _local_folder(path, subfolder)
    where = weight_files(folder)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype):  # dtype None: the config's
        model = cls.from_config(cls.load_config(str(folder))).eval()  # as from_pretrained returns it
    named = list(model.named_parameters())
    missing = [n for n, _ in named if n not in where]
    if missing:
        raise KeyError(f"{folder}: no weights for {missing[:3]} ({len(missing)} parameters)")
    rank0 = dist.get_rank() == 0
    batch: list = []

    def fill(batch):
        with deepspeed.zero.GatheredParameters([p for _, p in batch], modifier_rank=0):
            if rank0:
                for name, p in batch:
                    with safe_open(str(where[name]), "pt") as sf:
                        p.data.copy_(sf.get_tensor(name))
        release_freed_memory()  # else glibc keeps each freed gather buffer, and the peak grows to the whole model

    size = 0
    for name, p in named:  # the same order on every rank: each gather is a collective
        batch.append((name, p))
        size += p.ds_numel
        if size >= chunk:
            fill(batch)
            batch, size = [], 0
    if batch:
        fill(batch)
    for name, buf in model.named_buffers():  # buffers are not partitioned: every rank reads its own
        if name in where:
            with safe_open(str(where[name]), "pt") as sf:
                buf.copy_(sf.get_tensor(name))
    return model


def weight_files(folder) -> dict:
    """{tensor name: file} of a diffusers model folder's default weights: the shard index if there is
    one, else the single file (never a variant such as *.fp16.safetensors beside them)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "diffusion_pytorch_model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors (or its index) in {folder}")
    with safe_open(str(single), "pt") as sf:
        return {k: single for k in sf.keys()}


def release_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc's malloc_trim): gathered buffers of a few MB
    land on the heap once glibc's adaptive mmap threshold has grown, and freeing them does not shrink it."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _local_folder(path: str, subfolder: str):
    from pathlib import Path

    folder = Path(path) / subfolder
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download  # a hub id: this part's files only

    patterns = [f"{subfolder}/config.json", f"{subfolder}/diffusion_pytorch_model.safetensors",
                f"{subfolder}/diffusion_pytorch_model-*-of-*.safetensors",
                f"{subfolder}/diffusion_pytorch_model.safetensors.index.json"]
    return Path(snapshot_download(path, allow_patterns=patterns)) / subfolder


def optimizer(params, cfg: TrainConfig, on_gpu: bool, fused: bool | None = None) -> torch.optim.Optimizer:
    """`train.optimizer` over `params` at `learning_rate` (the schedule multiplies it)."""
    if cfg.offload != "none":  # the state lives on the host: DeepSpeed's vectorised CPU AdamW updates it there
        return cpu_adamw(params, cfg.learning_rate, cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # The run's rate under its lr_scheduler, as every optimizer here: Adafactor's own relative step
        # (lr=None, 1/sqrt(t)) would ignore both; scale_parameter off, as kohya's fixed-rate recipe.
        return Adafactor(params, lr=cfg.learning_rate, relative_step=False, scale_parameter=False,
                         warmup_init=False, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        return prodigy(params, cfg, on_gpu)
    # One fused kernel for the whole update on GPU; multi-tensor (foreach) on CPU, where fused is slower.
    kind = {"fused": True} if (on_gpu if fused is None else fused) else {"foreach": True}
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **kind)


def prodigy(params, cfg: TrainConfig, on_gpu: bool):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        from .errors import UserError

        raise UserError("train.optimizer 'prodigy' needs the prodigyopt package on the training workers "
                        "(pip install 'dreambooth-ray[prodigy]', or pip install prodigyopt)") from None
    import torch.distributed as dist

    # ZeRO on several workers gives each a partition: Prodigy's step size estimate sums over all of them
    # (its all-reduce, on CUDA only), so every rank takes the same step.
    sharded = cfg.zero_stage > 0 and dist.is_initialized() and dist.get_world_size() > 1
    if sharded and not on_gpu:
        from .errors import UserError

        raise UserError("train.optimizer 'prodigy' with zero_stage 1-3 on several CPU workers: prodigyopt sums "
                        "its step size estimate across partitions on CUDA only (use zero_stage 0 or one worker)")
    return Prodigy(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fsdp_in_use=sharded)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The multiplier of `learning_rate` at step k (0-based: the k-th optimizer step runs at it), as
    diffusers' get_scheduler computes it for `lr_scheduler` (warmup k/w, then the decay)."""
    import math

    from .spec import POLYNOMIAL_LR_END

    w, total, kind = cfg.lr_warmup_steps, cfg.steps, cfg.lr_scheduler

    def f(k: int) -> float:
        if kind == "constant":
            return 1.0
        if k < w:
            return k / max(1, w)
        progress = (k - w) / max(1, total - w)
        if kind == "linear":
            return max(0.0, (total - k) / max(1, total - w))
        if kind == "cosine":  # one half-wave (get_scheduler passes no num_cycles to it)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if kind == "cosine_with_restarts":
            return 0.0 if progress >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cfg.lr_num_cycles * progress) % 1.0))))
        if kind == "polynomial":
            lr, end = cfg.learning_rate, POLYNOMIAL_LR_END
            if k > total:
                return end / lr
            return ((lr - end) * (1 - (k - w) / max(1, total - w)) ** cfg.lr_power + end) / lr
        return 1.0  # constant_with_warmup, after the warmup

    return f


def cpu_adamw(params, lr: float, weight_decay: float = 1e-2):
    """DeepSpeed's CPU AdamW, with its bias correction a function of the step alone, so a resumed run
    equals an uninterrupted one bit for bit. Its kernel keeps beta^t as a running product and restarts
    it with pow() when the step jumps, as at a resume, which rounds differently (2.4e-7 apart after two
    steps here). Made afresh before each step, the kernel takes pow() every time (after the first)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    class CPUAdamW(DeepSpeedCPUAdam):
        def step(self, closure=None):
            g = self.param_groups[0]
            self.ds_opt_adam.destroy_adam(self.opt_id)
            self.ds_opt_adam.create_adam(self.opt_id, g["lr"], *g["betas"], g["eps"], g["weight_decay"],
                                         self.adam_w_mode, False)
            return super().step(closure)

    return CPUAdamW(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)


@torch.no_grad()
def latent_encoder(vae, device, chunk: int = 8):
    """pixels [N,3,H,W] in [-1,1] -> the VAE's latent distribution as [N, 2C, h, w] (mean || std).

    Training samples from the distribution each step (as the uncached recipe does), so caching
    its parameters changes no statistics, only removes the VAE from the step.
    """

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(pixels), chunk):
            dist = vae.encode(pixels[i : i + chunk].to(device, vae.dtype)).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
        return torch.cat(out)

    return encode


def diffusion_step(model, noise_scheduler, rows, n_instance, g, prior_weight, dtype, device, *,
                   autocast=None, family=None, cfg: TrainConfig | None = None, vae=None, scaling_factor=None,
                   shift_factor=0.0, channels_last=False, mask=None, **text):
    """One noise-prediction forward pass over [subject rows; class rows] and the DreamBooth loss
    (the inputs: `diffusion_inputs`). `mask`: the subject rows' masks (loss.masked_mse), area-averaged
    to the latent grid if they are not on it already."""
    noisy, t, target, weights = diffusion_inputs(noise_scheduler, rows, g, dtype, device, vae=vae,
                                                 scaling_factor=scaling_factor, shift_factor=shift_factor,
                                                 channels_last=channels_last, family=family, cfg=cfg)
    return denoise_loss(model, noisy, t, target, n_instance, prior_weight, device, autocast, weights, mask=mask,
                        **text)


def diffusion_inputs(noise_scheduler, rows, g, dtype, device, *, vae=None, scaling_factor=None, shift_factor=0.0,
                     channels_last=False, family=None, cfg: TrainConfig | None = None):
    """(noisy, timesteps, target, per-row loss weights or None) for `rows`, every draw from `g`.

    `rows` are pixels (encoded here by `vae`), cached latent distributions (mean || std), or, for a
    pixel-space model (no VAE, `scaling_factor=None`), the pixels that are themselves diffused.
    The family (default: Stable Diffusion's) states the objective: timestep sampling, noising, target,
    weights (`cfg.flow` configures the flow-matching families'). Latents are (z - shift) * scale, the
    shift being the VAE's `shift_factor` (SD3, Flux; 0 elsewhere).
    """
    from .families import SD

    family = family or SD
    with torch.no_grad():
        if vae is None and scaling_factor is None:
            latents = rows.to(device).float()
        else:
            if vae is not None:
                dist = vae.encode(rows.to(device, vae.dtype)).latent_dist
                mean, std = dist.mean, dist.std
                scaling_factor = vae.config.scaling_factor
                shift_factor = vae.config.get("shift_factor") or 0.0
            else:
                mean, std = rows.to(device).chunk(2, dim=1)
            eps = torch.randn(mean.shape, generator=g).to(device, mean.dtype)
            latents = ((mean + std * eps - shift_factor) * scaling_factor).float()
    noise = torch.randn(latents.shape, generator=g)
    if cfg is not None and cfg.noise_offset:  # one shift per (row, channel): lets the model move mean brightness
        noise = noise + cfg.noise_offset * torch.randn(*noise.shape[:2], *[1] * (noise.dim() - 2), generator=g)
    noise = noise.to(device, latents.dtype)
    t = family.sample_timesteps(noise_scheduler, latents.shape[0], g, cfg, latents.shape).to(device)
    noisy = family.noisy(noise_scheduler, latents, noise, t).to(dtype)
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    target = family.target(noise_scheduler, latents, noise, t)
    return noisy, t, target, family.loss_weights(noise_scheduler, t, cfg)


def denoise_loss(model, x, t, target, n_instance, prior_weight, device, autocast=None, weights=None, mask=None,
                 **cond):
    """The denoiser's prediction on `x` at timesteps `t` against `target`: the DreamBooth loss over
    [subject rows; class rows]. Shared by the base stage and the SR stage (sr.py)."""
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        pred = model(x, t, **cond)
    if pred.shape[1] == 2 * target.shape[1]:  # learned variance (IF): train the noise half, as IF's recipe does
        pred = pred[:, : target.shape[1]]
    if weights is not None:  # per-row weights w: mean(w * (pred - target)^2) is MSE on sqrt(w)-scaled rows
        w = weights.float().sqrt().view(-1, *[1] * (pred.dim() - 1)).to(pred.device)
        pred, target = pred.float() * w, target.float() * w
    return prior_preservation_loss(pred, target, n_instance, prior_weight, mask)


@dataclass
class Engine:
    """A worker's DeepSpeed engine, its data, and the stage's loss (base: `diffusion_step`; SR: sr.py)."""

    ds: object  # deepspeed.DeepSpeedEngine
    data: DreamBoothData
    cfg: TrainConfig
    loss: Callable  # (model, rows, n_instance, generator) -> (loss, subject loss, prior loss)
    checkpoint_wait: float = 0.0  # seconds the optimizer steps waited for an async checkpoint's copy

    def step(self, step: int, rank: int = 0) -> torch.Tensor:
        """One optimizer step (all micro-steps); returns [loss, subject loss, prior loss], averaged."""
        # Summed on the training device: the caller all-reduces them, and NCCL reduces no CPU tensors.
        cfg, sums = self.cfg, torch.zeros(3, device=self.ds.device)
        for micro in range(cfg.gradient_accumulation):
            g = step_generator(cfg.seed, step, micro, rank)
            # Dropout (T5's, when it trains) draws from the global generator: seeded per step, a resumed
            # run draws what the uninterrupted one drew.
            torch.manual_seed(g.initial_seed() ^ 0x5DEECE66D)  # not g's own stream (noise, rows)
            if getattr(self.data, "per_photo", False):  # masks, captions: picked with each row
                rows, n_inst, cond, extras = self.data.batch(cfg.batch_size, g, with_cond=True, with_extras=True)
                loss, inst, prior = self.loss(self.ds, rows, n_inst, g, cond, **extras)
            elif getattr(self.data, "row_cond", None) is not None:  # per-photo conditioning (SDXL's time ids)
                rows, n_inst, cond = self.data.batch(cfg.batch_size, g, with_cond=True)
                loss, inst, prior = self.loss(self.ds, rows, n_inst, g, cond)
            else:
                rows, n_inst = self.data.batch(cfg.batch_size, g)
                loss, inst, prior = self.loss(self.ds, rows, n_inst, g)
            self.ds.backward(loss)
            # An async checkpoint copies the weights and optimizer state beside forward and backward,
            # which only read them; the optimizer step changes them in place.
            self.checkpoint_wait += snapshot.settle(self.ds)
            self.ds.step()
            sums += torch.stack([loss.detach().float(), inst.float(), prior.float()]).to(sums.device)
        return sums / cfg.gradient_accumulation

    def lr(self) -> float:
        return self.ds.lr_scheduler.get_last_lr()[0]


def initialize(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, fused: bool | None = None,
               config: dict | None = None):
    """The DeepSpeed engine over `model`'s trainable parameters (torch.distributed initialised);
    `config`: DeepSpeed's, default `deepspeed_config(cfg)`."""
    import deepspeed

    if device.type == "cpu":
        no_shm_comm()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, cfg, on_gpu=device.type == "cuda", fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                       config=config or deepspeed_config(cfg))
    return ds


@dataclass
class FrozenInputs:
    """What a run computes once from its frozen parts: the prompts' conditioning (frozen text encoders;
    rows [instance x batch; class x batch]) and the latent pools of the photos and class images (a
    frozen VAE with cached latents). Made by `frozen_inputs`, in `build` or in a Ray task off the
    training workers (encode.py), which then never load those parts."""

    conditioning: dict | None = None
    instance: torch.Tensor | None = None
    classes: torch.Tensor | None = None
    scaling_factor: float | None = None
    shift_factor: float = 0.0
    masks: torch.Tensor | None = None  # the photos' masks on the latent grid (DreamBoothData.mask_pool)


def trained_encoders(family, cfg: TrainConfig) -> set[str]:
    return set(family.trainable_encoders) if cfg.train_text_encoder or (cfg.method == "lora" and cfg.lora.text_encoder) else set()


def frozen_parts(family, cfg: TrainConfig) -> set[str]:
    """The parts whose outputs FrozenInputs carries: a worker given them needs none of these. The text
    encoders that do not train (all, or SD3's and Flux's T5 beside trained CLIPs: family.frozen_states)
    and a VAE whose latents are cached."""
    out = set(family.text_encoders) - trained_encoders(family, cfg)
    return out | ({"vae"} if cfg.cache_latents and family.latent else set())


def prompts_of(instance_text: str, class_text: str, cfg: TrainConfig, with_prior: bool) -> list[str]:
    return [instance_text] * cfg.batch_size + ([class_text] * cfg.batch_size if with_prior else [])


def prompt_table(instance_text: str, class_text: str, cfg: TrainConfig, with_prior: bool,
                 captions: list | None = None) -> tuple[list[str], list[int] | None]:
    """The prompts the text encoders see once, and each photo's row among them (None: no photo has its
    own caption, and the rows are the step's [instance x batch; class x batch]). With captions: each
    distinct instance prompt once (the subject's first), then the class prompt."""
    if not captions or all(c is None for c in captions):
        return prompts_of(instance_text, class_text, cfg, with_prior), None
    texts = list(dict.fromkeys([instance_text] + [c for c in captions if c is not None]))
    rows = [texts.index(c or instance_text) for c in captions]
    return texts + ([class_text] if with_prior else []), rows


@torch.no_grad()
def frozen_inputs(parts: dict, instance, classes, instance_text: str, class_text: str, cfg: TrainConfig,
                  device: torch.device, masks: list | None = None, captions: list | None = None) -> FrozenInputs:
    from .families import SD

    family = parts.get("family") or SD
    out, frozen = FrozenInputs(), frozen_parts(family, cfg)
    if "vae" in frozen:  # every row once (fp32, each flip); the VAE then leaves the device for good
        vae = parts["vae"].requires_grad_(False).to(device, torch.float32)
        encode = latent_encoder(vae, device)
        out.instance = DreamBoothData.pool(instance, cfg.random_flip, encode)
        out.classes = DreamBoothData.pool(classes, cfg.random_flip, encode) if classes else None
        out.scaling_factor, out.shift_factor = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
        vae.to("cpu")
        out.masks = DreamBoothData.mask_pool(used_masks(masks, cfg, len(instance)), cfg.random_flip,
                                             out.instance.shape[-2:])
    if family.text_encoders[0] in frozen:  # the prompts' conditioning never changes: computed once
        encoders = {n: te.to(frozen_dtype(cfg)).eval() for n, te in family.encoders(parts).items()}
        texts, _ = prompt_table(instance_text, class_text, cfg, bool(classes), captions)
        inputs = family.prompt_inputs(parts, texts)
        out.conditioning = family.encode_frozen(encoders, inputs, device)
    elif frozen & set(family.text_encoders):  # frozen beside trained ones (T5 beside CLIPs): their share
        for name in frozen & set(family.text_encoders):
            parts[name].to(frozen_dtype(cfg)).eval()
        texts, _ = prompt_table(instance_text, class_text, cfg, bool(classes), captions)
        out.conditioning = family.frozen_states(parts, family.prompt_inputs(parts, texts), device)
    return out


def used_masks(masks: list | None, cfg: TrainConfig, n: int) -> list:
    """The photos' masks that weight the loss: none with `train.masked_loss: off`."""
    return [None] * n if masks is None or cfg.masked_loss == "off" else masks


def build(parts: dict, instance, classes, instance_text: str, class_text: str, cfg: TrainConfig,
          prior_weight: float, device: torch.device, fused: bool | None = None, geometry: list | None = None,
          frozen: FrozenInputs | None = None, masks: list | None = None, captions: list | None = None) -> Engine:
    """Data, model and DeepSpeed engine for one subject's base stage on this worker. `parts` are the
    family's (models.load_components); `geometry`: each subject photo's (original h, w, crop top,
    left, resized h, w), for a family that conditions on it (SDXL); `frozen`: what the frozen parts
    make, computed elsewhere (then `parts` need not hold them), else computed here; `masks`: each
    photo's [H, W] subject mask or None (images.SubjectImage.mask); `captions`: each photo's own instance
    prompt (placeholders substituted) or None."""
    from .families import SD

    family = parts.get("family") or SD
    dtype = weight_dtype(cfg)
    if device.type == "cuda":  # fp32 matmuls (frozen parts, fp32 mode) on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    step_kw: dict = {"channels_last": cfg.channels_last, "autocast": autocast_dtype(cfg), "family": family, "cfg": cfg}
    row_cond = family.row_conditioning(geometry or [None] * len(instance), cfg.resolution, cfg.random_flip)
    class_cond = family.row_conditioning([None] * len(classes), cfg.resolution, cfg.random_flip) if classes else None
    cond = {} if row_cond is None else {"row_cond": row_cond, "class_cond": class_cond}
    if frozen is None:  # computed here, as the encode task computes it elsewhere
        frozen = frozen_inputs(parts, instance, classes, instance_text, class_text, cfg, device, masks, captions)
    texts, caption_rows = prompt_table(instance_text, class_text, cfg, bool(classes), captions)
    if caption_rows is not None:
        cond["captions"] = torch.tensor(caption_rows).view(-1, 1).expand(-1, 2 if cfg.random_flip else 1).contiguous()
    if frozen.instance is not None:  # cached latents (the VAE's distribution, both flips)
        data = DreamBoothData.of_pools(frozen.instance, frozen.classes, cfg.random_flip, masks=frozen.masks, **cond)
        step_kw.update(scaling_factor=frozen.scaling_factor, shift_factor=frozen.shift_factor)
    else:  # pixels: a pixel-space model (IF stage I) diffuses them, else the VAE encodes them every step
        data = DreamBoothData(instance, classes, cfg.random_flip, masks=DreamBoothData.mask_pool(
            used_masks(masks, cfg, len(instance)), cfg.random_flip), **cond)
        if family.latent:
            fp32 = family.vae_fp32 or dtype == torch.float16  # SDXL's VAE overflows in fp16
            step_kw["vae"] = parts["vae"].requires_grad_(False).to(device, torch.float32 if fp32 else dtype)

    encoders = {n: te for n, te in family.encoders(parts).items() if te is not None}
    lora = cfg.method == "lora"
    trained = trained_encoders(family, cfg)
    for name, te in encoders.items():
        # Hub encoders may be stored in 16 bits: trained ones train in fp32. Modes as in training:
        # from_pretrained returns eval mode, which would switch off a trained T5's dropout.
        te.float().train() if name in trained else te.to(frozen_dtype(cfg)).eval()
        if name in trained and cfg.gradient_checkpointing:
            te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        with fp32_view(parts[family.denoiser]):
            family.add_lora(parts, cfg)
    denoiser = parts[family.denoiser].train()
    if lora and cfg.mixed_precision == "bf16":  # bf16-weights/fp16: DeepSpeed casts the whole module
        freeze_to(denoiser, torch.bfloat16)
        for name in trained:
            freeze_to(encoders[name], torch.bfloat16)
    configure_denoiser(denoiser, cfg, family)
    step_kw.update(family.fixed_conditioning(cfg, denoiser))
    if trained:
        model = DreamBoothModel(denoiser, family=family, **{n: encoders[n] for n in family.trainable_encoders})
        text = family.trained_inputs(parts, family.prompt_inputs(parts, texts), device, frozen.conditioning)
    else:
        text = {k: v.to(device, dtype) for k, v in frozen.conditioning.items()}
        model = DreamBoothModel(denoiser, family=family)
    noise_scheduler = parts["noise_scheduler"]
    # What the run no longer needs goes now, from the caller's dict too (a worker holds it for the whole
    # run): frozen encoders, their states computed (T5-XXL is 19 GB in fp32), and a VAE whose latents are cached.
    for name in frozen_parts(family, cfg) | (set(encoders) - trained):  # a frozen T5 beside a trained CLIP too
        parts[name] = None

    def loss(model, rows, n, g, row_cond=None, mask=None, caption=None):
        extra = {} if row_cond is None else {family.row_key: row_cond.to(device)}
        if mask is not None:
            extra["mask"] = mask
        rows_text = text
        if caption is not None:  # each subject row its photo's prompt, each class row the class prompt's
            pick = torch.cat([caption, torch.full((len(rows) - n,), len(texts) - 1)]).to(device)
            rows_text = {k: v[pick] for k, v in text.items()}
        return diffusion_step(model, noise_scheduler, rows, n, g, prior_weight, dtype, device, **step_kw, **extra,
                              **rows_text)

    return Engine(initialize(model, cfg, device, fused), data, cfg, loss)

