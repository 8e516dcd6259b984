"""What a training worker runs, without Ray: the trained module, its DeepSpeed config, and one step.

Kept free of Ray so that `bench.py` times exactly this code against the reference recipe.
The speed-ups live here, each behind a `train.*` switch that the benchmark turns on and off:
VAE latents cached once (both flip variants), SDPA attention, channels_last, torch.compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .data import DreamBoothData, step_generator
from .loss import diffusion_target, prior_preservation_loss
from .spec import TrainConfig


def weight_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype DeepSpeed keeps the trained weights in (and feeds the model)."""
    return {"bf16-weights": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)


def autocast_dtype(cfg: TrainConfig) -> torch.dtype | None:
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else None


class DreamBoothModel(torch.nn.Module):
    """What DeepSpeed trains: the UNet, and the text encoder when it is trained too."""

    def __init__(self, unet, text_encoder=None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy_latents, timesteps, input_ids=None, encoder_hidden_states=None, class_labels=None,
                attention_mask=None):
        if self.text_encoder is not None:  # the mask as in inference: T5 (IF) reads it, CLIP gets None
            encoder_hidden_states = self.text_encoder(input_ids, attention_mask=attention_mask)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, class_labels=class_labels).sample


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


def configure_unet(unet, cfg: TrainConfig) -> None:
    """Attention kernel and memory layout: settings that change speed, not what is computed."""
    from .models import set_sdpa

    set_sdpa(unet, classic=cfg.attention == "classic")
    # channels_last is set on the step's input, not the weights: DeepSpeed broadcasts and flattens
    # parameters as contiguous buffers, and a conv with a channels_last input runs channels_last.
    if cfg.compile:
        unet.compile()  # in place: parameter names (and so checkpoints) stay those of the plain UNet


def deepspeed_config(cfg: TrainConfig) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True)
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


def optimizer(params, cfg: TrainConfig, on_gpu: bool, fused: bool | None = None) -> torch.optim.Optimizer:
    # One fused kernel for the whole update on GPU; multi-tensor (foreach) on CPU, where fused is slower.
    kind = {"fused": True} if (on_gpu if fused is None else fused) else {"foreach": True}
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2, **kind)


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
                   vae=None, scaling_factor=None, channels_last=False, autocast=None, **text):
    """One noise-prediction forward pass over [subject rows; class rows] and the DreamBooth loss.

    `rows` are pixels (encoded here by `vae`), cached latent distributions (mean || std), or, for a
    pixel-space model (no VAE, `scaling_factor=None`), the pixels that are themselves diffused.
    """
    with torch.no_grad():
        if vae is None and scaling_factor is None:
            latents = rows.to(device).float()
        else:
            if vae is not None:
                dist = vae.encode(rows.to(device, vae.dtype)).latent_dist
                mean, std = dist.mean, dist.std
                scaling_factor = vae.config.scaling_factor
            else:
                mean, std = rows.to(device).chunk(2, dim=1)
            eps = torch.randn(mean.shape, generator=g).to(device, mean.dtype)
            latents = ((mean + std * eps) * scaling_factor).float()
    noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t).to(dtype)
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    target = diffusion_target(noise_scheduler, latents, noise, t)
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        pred = model(noisy, t, **text)
    if pred.shape[1] == 2 * target.shape[1]:  # learned variance (IF): train the noise half, as IF's recipe does
        pred = pred[:, : target.shape[1]]
    return prior_preservation_loss(pred, target, n_instance, prior_weight)


@dataclass
class Engine:
    """A worker's DeepSpeed engine, its data, and the stage's loss (base: `diffusion_step`; SR: sr.py)."""

    ds: object  # deepspeed.DeepSpeedEngine
    data: DreamBoothData
    cfg: TrainConfig
    loss: Callable  # (model, rows, n_instance, generator) -> (loss, subject loss, prior loss)

    def step(self, step: int, rank: int = 0) -> torch.Tensor:
        """One optimizer step (all micro-steps); returns [loss, subject loss, prior loss], averaged."""
        # Summed on the training device: the caller all-reduces them, and NCCL reduces no CPU tensors.
        cfg, sums = self.cfg, torch.zeros(3, device=self.ds.device)
        for micro in range(cfg.gradient_accumulation):
            g = step_generator(cfg.seed, step, micro, rank)
            rows, n_inst = self.data.batch(cfg.batch_size, g)
            loss, inst, prior = self.loss(self.ds, rows, n_inst, g)
            self.ds.backward(loss)
            self.ds.step()
            sums += torch.stack([loss.detach().float(), inst.float(), prior.float()]).to(sums.device)
        return sums / cfg.gradient_accumulation

    def lr(self) -> float:
        return self.ds.lr_scheduler.get_last_lr()[0]


def initialize(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, fused: bool | None = None):
    """The DeepSpeed engine over `model`'s trainable parameters (torch.distributed initialised)."""
    import deepspeed

    if device.type == "cpu":
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference that training never calls:
        # 30-60 s on first use, and a compile killed midway leaves a lock that hangs every later run.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, cfg, on_gpu=device.type == "cuda", fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.lr_warmup_steps + 1)))
    ds, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg))
    return ds


def build(parts: dict, instance, classes, instance_text: str, class_text: str, cfg: TrainConfig,
          prior_weight: float, device: torch.device, fused: bool | None = None) -> Engine:
    """Data, model and DeepSpeed engine for one subject's base stage on this worker."""
    dtype = weight_dtype(cfg)
    if device.type == "cuda":  # fp32 matmuls (frozen parts, fp32 mode) on TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    tok, te, vae = parts["tokenizer"], parts["text_encoder"], parts["vae"]
    step_kw: dict = {"channels_last": cfg.channels_last, "autocast": autocast_dtype(cfg)}
    if vae is None:  # a pixel-space model (IF stage I): the images themselves are diffused
        data = DreamBoothData(instance, classes, cfg.random_flip)
    elif cfg.cache_latents:
        vae.requires_grad_(False)
        # Encode every row once (fp32, both flips); the VAE then leaves the device for good.
        data = DreamBoothData(instance, classes, cfg.random_flip, latent_encoder(vae.to(device), device))
        step_kw["scaling_factor"] = vae.config.scaling_factor
        vae.to("cpu")
    else:
        data = DreamBoothData(instance, classes, cfg.random_flip)
        step_kw["vae"] = vae.requires_grad_(False).to(device, torch.float32 if dtype == torch.float16 else dtype)

    prompt_ids, mask = token_ids(tok, [instance_text] * cfg.batch_size
                                 + ([class_text] * cfg.batch_size if data.with_prior else []), with_mask=True)
    mask = mask if te.config.model_type == "t5" else None  # T5 (IF) reads the padding mask; SD's CLIP does not
    lora = cfg.method == "lora"
    if lora:
        add_lora(parts["unet"], te, cfg)
    configure_unet(parts["unet"], cfg)
    if cfg.train_text_encoder or (lora and cfg.lora.text_encoder):
        model = DreamBoothModel(parts["unet"], te)
        step_kw["input_ids"] = prompt_ids.to(device)
        if mask is not None:
            step_kw["attention_mask"] = mask.to(device)
    else:
        # Frozen text encoder: the two prompts' embeddings never change, so compute them once.
        step_kw["encoder_hidden_states"] = frozen_text_embeddings(te, prompt_ids, device, mask).to(dtype)
        model = DreamBoothModel(parts["unet"])
    noise_scheduler = parts["noise_scheduler"]

    def loss(model, rows, n, g):
        return diffusion_step(model, noise_scheduler, rows, n, g, prior_weight, dtype, device, **step_kw)

    return Engine(initialize(model, cfg, device, fused), data, cfg, loss)


def token_ids(tok, prompts: list[str], with_mask: bool = False):
    t = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return (t.input_ids, t.attention_mask) if with_mask else t.input_ids


@torch.no_grad()
def frozen_text_embeddings(te, ids, device, attention_mask=None) -> torch.Tensor:
    te.requires_grad_(False).to(device)
    out = te(ids.to(device), attention_mask=None if attention_mask is None else attention_mask.to(device))[0]
    te.to("cpu")
    return out
