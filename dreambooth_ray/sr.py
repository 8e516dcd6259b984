"""The super-resolution stage, as in the DreamBooth paper: an SR diffusion model fine-tuned on the subject.

Each subject photo at the output resolution is paired with its own downsampled version at the input
resolution. The SR UNet (DeepFloyd IF stage II layout) sees [noisy high-res image; upsampled real
low-res image] and the low-res image's noise-augmentation level as its class label. That level is
low (1e-5 by default, the paper's choice) so the model learns to keep the subject's fine detail.
(The diffusers IF stage II DreamBooth path instead feeds the noisy target into the low-res channels.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import engine
from .data import DreamBoothData
from .loss import diffusion_target, prior_preservation_loss
from .spec import SRConfig, TrainConfig


def upsample(lo: torch.Tensor, size: int) -> torch.Tensor:
    # What IFSuperResolutionPipeline does to its input image, so training matches inference.
    return F.interpolate(lo, (size, size), mode="bilinear", align_corners=True)


def lowres_pairs(in_res: int):
    """pixels [N,3,H,W] -> [N,6,H,W]: the image, and its real low-res version upsampled back to H."""

    def pair(hi: torch.Tensor) -> torch.Tensor:
        lo = F.interpolate(hi, (in_res, in_res), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        return torch.cat([hi, upsample(lo, hi.shape[-1])], dim=1)

    return pair


def augment(lo: torch.Tensor, level: float, noising_scheduler, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise augmentation at level s in [0, 1] of the noising schedule (continuous: alpha-bar is
    interpolated between integer timesteps). Returns the noised image and its class labels, s*(T-1)."""
    ac = noising_scheduler.alphas_cumprod.double()
    t = level * (len(ac) - 1)
    i = min(int(t), len(ac) - 2)
    abar = float(ac[i] + (ac[i + 1] - ac[i]) * (t - i))
    eps = torch.randn(lo.shape, generator=g).to(lo.device, lo.dtype)
    labels = torch.full((lo.shape[0],), t, device=lo.device, dtype=torch.float32)
    return abar**0.5 * lo + (1 - abar) ** 0.5 * eps, labels


def sr_inputs(rows: torch.Tensor, noise_scheduler, noising_scheduler, noise_aug: float, g, device):
    """(model input [noisy hi; augmented real low-res], timesteps, class labels, target) for rows [hi; lo_up]."""
    hi, lo = rows.to(device).float().chunk(2, dim=1)
    noise = torch.randn(hi.shape, generator=g).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (hi.shape[0],), generator=g).to(device)
    noisy = noise_scheduler.add_noise(hi, noise, t)
    lo_aug, labels = augment(lo, noise_aug, noising_scheduler, g)
    return torch.cat([noisy, lo_aug], dim=1), t, labels, diffusion_target(noise_scheduler, hi, noise, t)


def sr_step(model, noise_scheduler, noising_scheduler, rows, n_instance, g, prior_weight, noise_aug, dtype, device,
            autocast=None, **text):
    x, t, labels, target = sr_inputs(rows, noise_scheduler, noising_scheduler, noise_aug, g, device)
    with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        pred = model(x.to(dtype), t, class_labels=labels, **text)
    if pred.shape[1] == 2 * target.shape[1]:  # learned variance (IF): train the noise half, as IF's recipe does
        pred = pred[:, : target.shape[1]]
    return prior_preservation_loss(pred, target, n_instance, prior_weight)


def build(parts: dict, instance, classes, instance_text: str, class_text: str, cfg: TrainConfig, sr: SRConfig,
          in_res: int, device: torch.device) -> engine.Engine:
    """The SR stage's engine: same DeepSpeed path as the base stage, another loss."""
    dtype = engine.weight_dtype(cfg)
    data = DreamBoothData(instance, classes, cfg.random_flip, encode=lowres_pairs(in_res))
    ids, mask = engine.token_ids(parts["tokenizer"], [instance_text] * cfg.batch_size
                                 + ([class_text] * cfg.batch_size if data.with_prior else []), with_mask=True)
    states = engine.frozen_text_embeddings(parts["text_encoder"], ids, device, mask).to(dtype)
    engine.configure_unet(parts["unet"], cfg)
    model = engine.DreamBoothModel(parts["unet"])
    noise_s, noising_s = parts["noise_scheduler"], parts["image_noising_scheduler"]
    autocast = engine.autocast_dtype(cfg)

    def loss(model, rows, n, g):
        return sr_step(model, noise_s, noising_s, rows, n, g, sr.prior_loss_weight, sr.noise_aug, dtype, device,
                       autocast, encoder_hidden_states=states)

    return engine.Engine(engine.initialize(model, cfg, device), data, cfg, loss)


def noise_level(sr: SRConfig, pipe) -> int:
    """The pipeline's integer noise level nearest to the trained continuous one."""
    return round(sr.noise_aug * (pipe.image_noising_scheduler.config.num_train_timesteps - 1))


def upscale(pipe, prompt: str, image, sr: SRConfig, seed: int):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    g = torch.Generator(device).manual_seed(seed)
    size = sr.output_resolution
    return pipe(prompt, image=image, height=size, width=size, num_inference_steps=sr.inference_steps,
                noise_level=noise_level(sr, pipe), generator=g, clean_caption=False, output_type="pil").images[0]
