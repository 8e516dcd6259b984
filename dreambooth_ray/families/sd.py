"""Stable Diffusion 1.x/2.x (StableDiffusionPipeline), and the Stable Diffusion x4 upscaler as an SR family.

SD: latent diffusion, a CLIP text encoder (no padding mask), epsilon or v-prediction per its scheduler.
x4: latents of the subject photo beside the real low-res image (7 input channels), the low-res noise
level as an integer class label; trained by sr.py.
"""

from __future__ import annotations

from . import original as og
from .base import Family, kohya_lora


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline = "StableDiffusionPipeline"
    tags = ("stable-diffusion",)

    def _v2(self, pipe) -> bool:  # OpenCLIP ViT-H (1024 wide) is SD 2's text encoder, CLIP ViT-L (768) SD 1's
        return pipe.text_encoder.config.hidden_size == 1024

    def architecture(self, pipe) -> str:
        if not self._v2(pipe):
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if self.prediction_type(pipe) == "v" else "stable-diffusion-v2-512"

    def kohya_base_version(self, pipe) -> str:
        return "sd_v2" if self._v2(pipe) else "sd_v1"

    def kohya_lora_state_dict(self, pipe, with_text_encoder: bool):
        # kohya trains SD 1.x/2.x on diffusers' UNet: its module paths are diffusers' own.
        return {**kohya_lora(pipe.unet, "lora_unet"),
                **(kohya_lora(pipe.text_encoder, "lora_te") if with_text_encoder else {})}

    def single_file_state_dict(self, pipe) -> dict:
        """LDM's layout, as SD 1.x/2.x shipped: SD1's CLIP in transformers' layout, SD2's OpenCLIP in its own."""
        te = pipe.text_encoder
        text = (og.prefixed("cond_stage_model.model.", og.open_clip(te)) if og.is_open_clip(te)
                else og.prefixed("cond_stage_model.transformer.", og.hf_clip(te)))
        return {**og.prefixed("model.diffusion_model.", og.ldm_unet(pipe.unet)),
                **og.prefixed("first_stage_model.", og.ldm_vae(pipe.vae)), **text, **self.single_file_extras(pipe)}

    def single_file_extras(self, pipe) -> dict:
        return og.v_prediction_markers(pipe.scheduler)


class SRFamily(Family):
    """A super-resolution family: loads its parts with the low-res noising schedule; sr.py trains it
    (full fine-tuning, frozen text encoder)."""

    role = "sr"
    layout = ""  # "if" (pixels: [noisy; upsampled low-res]) or "x4" (latents: [noisy latents; low-res])
    noising_scheduler = ""  # the subfolder of the low-res noise-augmentation schedule
    supports = {"full": True, "lora": False, "text_encoder": False, "sr": True}

    def load_parts(self, path: str, partitioned=None, skip: frozenset = frozenset()) -> dict:
        from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline

        index = DiffusionPipeline.load_config(path)
        parts = dict(
            unet=None if "unet" in skip else self.load_denoiser(path, partitioned),
            tokenizer=self._tokenizer(path),
            text_encoder=None if "text_encoder" in skip else self._text_encoder(path, index, "text_encoder"),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            image_noising_scheduler=DDPMScheduler.from_pretrained(path, subfolder=self.noising_scheduler),
            family=self,
        )
        if self.latent:
            parts["vae"] = None if "vae" in skip else AutoencoderKL.from_pretrained(path, subfolder="vae")
        return parts

    def noising(self, pipe):
        return getattr(pipe, self.noising_scheduler)


class X4Upscaler(SRFamily):
    name = "x4"
    title = "Stable Diffusion x4 upscaler"
    pipeline = "StableDiffusionUpscalePipeline"
    layout = "x4"
    noising_scheduler = "low_res_scheduler"


SD = StableDiffusion()
X4 = X4Upscaler()
