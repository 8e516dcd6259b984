"""The super-resolution stage, as in the DreamBooth paper: an SR diffusion model fine-tuned on the subject.

Each subject photo at the output resolution is paired with its own downsampled version at the input
resolution. The SR UNet sees the noisy target beside the real low-res image, and the low-res image's
noise-augmentation level as its class label. That level is low (1e-5 by default, the paper's choice)
so the model learns to keep the subject's fine detail. Two layouts:

- "if": DeepFloyd IF stage II, in pixels: [noisy image; low-res image upsampled], integer level.
  (The diffusers IF stage II DreamBooth path instead feeds the noisy target into the low-res channels.)
- "x4": the Stable Diffusion x4 upscaler, in latents: [noisy latents; low-res image] (the VAE
  downsamples by 4, so both share a size), integer level.

Both pipelines take integer noise levels only, so both layouts train on round(noise_aug * (T-1)):
the paper's 1e-5 rounds to 0 (no augmentation), and 1e-3 to 1 on a 1000-step schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from . import engine
from .data import DreamBoothData
from .loss import diffusion_target
from .spec import SRConfig, TrainConfig


def layout(unet) -> str:
    """The SR family's layout ("x4" or "if") of a loaded UNet (a pipeline's family says it too)."""
    return "x4" if unet.config.in_channels == 7 else "if"


def downsample(hi: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(hi, (size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def upsample(lo: torch.Tensor, size: int) -> torch.Tensor:
    # What IFSuperResolutionPipeline does to its input image, so training matches inference.
    return F.interpolate(lo, (size, size), mode="bilinear", align_corners=True)


def lowres_pairs(in_res: int):
    """pixels [N,3,H,W] -> [N,6,H,W]: the image, and its real low-res version upsampled back to H."""

    def pair(hi: torch.Tensor) -> torch.Tensor:
        return torch.cat([hi, upsample(downsample(hi, in_res), hi.shape[-1])], dim=1)

    return pair


def latent_pairs(vae, in_res: int, device):
    """x4 layout: pixels [N,3,H,W] -> [N, 2C+3, h, w]: the VAE latent distribution (mean || std, as
    the base stage caches it) and the real low-res image, which must be the latents' size."""
    encode = engine.latent_encoder(vae, device)

    def pair(hi: torch.Tensor) -> torch.Tensor:
        z = encode(hi)
        if z.shape[-1] != in_res:
            raise ValueError(f"sr.input_resolution must be {z.shape[-1]} for a {hi.shape[-1]} px output with this "
                             f"x4 upscaler (its VAE makes {z.shape[-1]} px latents), not {in_res}")
        return torch.cat([z, downsample(hi, in_res)], dim=1)

    return pair


def integer_level(noise_aug: float, noising_scheduler) -> int:
    return round(noise_aug * (noising_scheduler.config.num_train_timesteps - 1))


def augment(lo: torch.Tensor, level: float, noising_scheduler, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise augmentation at level s in [0, 1] of the noising schedule, at the integer timestep
    round(s * (T-1)): the only levels IF's pipeline can sample with, so training conditions on what
    inference passes. Returns the noised image and its class labels (that timestep)."""
    t = torch.full((lo.shape[0],), integer_level(level, noising_scheduler), device=lo.device, dtype=torch.long)
    eps = torch.randn(lo.shape, generator=g).to(lo.device, lo.dtype)
    return noising_scheduler.add_noise(lo, eps, t), t


def sr_inputs(rows: torch.Tensor, noise_scheduler, noising_scheduler, noise_aug: float, g, device):
    """(model input [noisy hi; augmented real low-res], timesteps, class labels, target) for rows [hi; lo_up]."""
    hi, lo = rows.to(device).float().chunk(2, dim=1)
    noise = torch.randn(hi.shape, generator=g).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (hi.shape[0],), generator=g).to(device)
    noisy = noise_scheduler.add_noise(hi, noise, t)
    lo_aug, labels = augment(lo, noise_aug, noising_scheduler, g)
    return torch.cat([noisy, lo_aug], dim=1), t, labels, diffusion_target(noise_scheduler, hi, noise, t)


def x4_inputs(rows: torch.Tensor, noise_scheduler, noising_scheduler, noise_aug: float, scaling: float, g, device):
    """As sr_inputs, for rows [latent mean; latent std; low-res image] of the x4 layout."""
    rows = rows.to(device).float()
    c = (rows.shape[1] - 3) // 2
    mean, std, lo = rows.split([c, c, 3], dim=1)
    latents = (mean + std * torch.randn(mean.shape, generator=g).to(device)) * scaling
    noise = torch.randn(latents.shape, generator=g).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
    labels = torch.full((latents.shape[0],), integer_level(noise_aug, noising_scheduler), device=device, dtype=torch.long)
    lo_aug = noising_scheduler.add_noise(lo, torch.randn(lo.shape, generator=g).to(device), labels)
    return (torch.cat([noise_scheduler.add_noise(latents, noise, t), lo_aug], dim=1), t, labels,
            diffusion_target(noise_scheduler, latents, noise, t))


def sr_step(model, noise_scheduler, noising_scheduler, rows, n_instance, g, prior_weight, noise_aug, dtype, device,
            autocast=None, kind: str = "if", scaling_factor: float = 1.0, **text):
    if kind == "x4":
        x, t, labels, target = x4_inputs(rows, noise_scheduler, noising_scheduler, noise_aug, scaling_factor, g, device)
    else:
        x, t, labels, target = sr_inputs(rows, noise_scheduler, noising_scheduler, noise_aug, g, device)
    return engine.denoise_loss(model, x.to(dtype), t, target, n_instance, prior_weight, device, autocast,
                               class_labels=labels, **text)


def frozen_parts(family) -> set[str]:
    """What an SR run's FrozenInputs carry, so its workers need none of these: the text encoder (never
    trained here) and the x4 layout's VAE (its latent pairs cached)."""
    return set(family.text_encoders) | ({"vae"} if family.latent else set())


@torch.no_grad()
def frozen_inputs(parts: dict, instance, classes, instance_text: str, class_text: str, cfg: TrainConfig,
                  in_res: int, device: torch.device) -> engine.FrozenInputs:
    """The SR run's frozen parts' outputs, in `build` or in the encode task (encode.py): the prompts'
    states and, for x4, the latent pairs of every photo and class image, each flip (DreamBoothData.pool:
    a flipped image's latents are not its latents flipped). IF's pairs are pixels, made on the worker."""
    family = parts["family"]
    out = engine.FrozenInputs()
    if family.latent:  # the VAE then leaves the device
        vae = parts["vae"].requires_grad_(False).to(device)
        encode = latent_pairs(vae, in_res, device)
        out.instance = DreamBoothData.pool(instance, cfg.random_flip, encode)
        out.classes = DreamBoothData.pool(classes, cfg.random_flip, encode) if classes else None
        out.scaling_factor = vae.config.scaling_factor
        vae.to("cpu")
    # The family encodes the prompts: IF's T5 sees the attention mask; the x4 upscaler's CLIP gets none.
    encoders = {n: te.to(engine.frozen_dtype(cfg)).eval() for n, te in family.encoders(parts).items()}
    prompts = engine.prompts_of(instance_text, class_text, cfg, bool(classes))
    out.conditioning = family.encode_frozen(encoders, family.prompt_inputs(parts, prompts), device)
    return out


def build(parts: dict, instance, classes, instance_text: str, class_text: str, cfg: TrainConfig, sr: SRConfig,
          in_res: int, device: torch.device, frozen: engine.FrozenInputs | None = None) -> engine.Engine:
    """The SR stage's engine: same DeepSpeed path as the base stage, another loss. `frozen`: what the
    frozen parts make, computed elsewhere (encode.py: then `parts` need not hold them), else here."""
    dtype = engine.weight_dtype(cfg)
    family = parts["family"]
    if frozen is None:
        frozen = frozen_inputs(parts, instance, classes, instance_text, class_text, cfg, in_res, device)
    if frozen.instance is not None:  # x4: latent pairs, cached as in the base stage
        data = DreamBoothData.of_pools(frozen.instance, frozen.classes, cfg.random_flip)
    else:
        data = DreamBoothData(instance, classes, cfg.random_flip, encode=lowres_pairs(in_res))
    states = frozen.conditioning["encoder_hidden_states"].to(device, dtype)
    for name in frozen_parts(family):  # frozen, used: not kept for the run
        parts[name] = None
    parts["unet"].train()
    engine.configure_denoiser(parts["unet"], cfg, family)
    model = engine.DreamBoothModel(parts["unet"], family=family)
    noise_s, noising_s = parts["noise_scheduler"], parts["image_noising_scheduler"]
    autocast, kind, scaling = engine.autocast_dtype(cfg), family.layout, frozen.scaling_factor or 1.0

    def loss(model, rows, n, g):
        return sr_step(model, noise_s, noising_s, rows, n, g, sr.prior_loss_weight, sr.noise_aug, dtype, device,
                       autocast, kind, scaling, encoder_hidden_states=states)

    return engine.Engine(engine.initialize(model, cfg, device), data, cfg, loss)


def noise_level(sr: SRConfig, pipe) -> int:
    """The pipeline's integer noise level nearest to the trained one."""
    return integer_level(sr.noise_aug, getattr(pipe, "image_noising_scheduler", None) or pipe.low_res_scheduler)


def upscale(pipe, prompt: str, image, sr: SRConfig, seed: int):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    g = torch.Generator(device).manual_seed(seed)
    common = dict(num_inference_steps=sr.inference_steps, noise_level=noise_level(sr, pipe), generator=g,
                  output_type="pil")
    if layout(pipe.unet) == "x4":  # the output is 4x the input; feed the input at the trained size
        lo = image.resize((sr.output_resolution // 4,) * 2, Image.Resampling.BICUBIC)
        return pipe(prompt, image=lo, **common).images[0]
    size = sr.output_resolution
    return pipe(prompt, image=image, height=size, width=size, clean_caption=False, **common).images[0]
