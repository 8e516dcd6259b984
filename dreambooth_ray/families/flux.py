"""Flux.1 (FluxPipeline): a 12B-parameter rectified-flow transformer on packed latents.

As FluxPipeline runs it: the VAE's latents (shifted and scaled by the VAE's shift and scaling
factors) are packed into 2x2 patches, one token each, with (0, row, column) position ids; the text
is T5's sequence (position ids all zero) and CLIP's pooled embedding; the timestep input is the noise
level itself (not 1000x); guidance-distilled models (Flux.1-dev) also take the guidance scale, fixed
during training (`train.flow.guidance`). The timestep shift is resolution-dependent (dynamic
shifting in the scheduler config: families/flow.py).
"""

from __future__ import annotations

import torch

from . import original as og
from .flow import FlowMatchingFamily


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: one token per 2x2 patch, as FluxPipeline._pack_latents."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """(0, row, column) of each packed token, for the rotary position embedding."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device)


class FluxFamily(FlowMatchingFamily):
    name = "flux"
    title = "Flux.1"
    pipeline = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    vae_fp32 = True
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    prompt_keys = ("input_ids", "input_ids_2")
    clip_encoders = ("text_encoder",)
    t5 = "text_encoder_2"
    max_sequence_length = 512
    tags = ("flux", "flux-diffusers")

    def architecture(self, pipe) -> str:  # dev is guidance-distilled (embeds a guidance value), schnell is not
        return "flux-1-dev" if pipe.transformer.config.guidance_embeds else "flux-1-schnell"

    def kohya_base_version(self, pipe) -> str:
        return "flux1"

    def encode(self, encoders: dict, input_ids, input_ids_2=None, t5_states=None) -> dict:
        pooled = encoders["text_encoder"](input_ids, output_hidden_states=False).pooler_output
        if t5_states is None:
            t5_states = self.t5_states(encoders[self.t5], input_ids_2)
        return {"encoder_hidden_states": t5_states.to(pooled.dtype), "pooled_projections": pooled}

    single_file_uis = "ComfyUI, Forge (the transformer; VAE and text encoders are the base model's)"

    def single_file_howto(self, file: str) -> list[str]:
        return [f"- ComfyUI: copy `{file}` into `ComfyUI/models/diffusion_models/` (a *Load Diffusion Model* node), "
                "with the base model's VAE (ae) and text encoders (clip_l, t5xxl).",
                "- Forge: copy it into `models/Stable-diffusion/`, with the same VAE and text encoders."]

    def single_file_state_dict(self, pipe) -> dict:
        """The transformer alone in BFL's layout, unprefixed, as flux1-dev.safetensors ships (ComfyUI's
        Load Diffusion Model, Forge, diffusers' FluxTransformer2DModel.from_single_file); the VAE (ae)
        and text encoders (clip_l, t5xxl) are the base model's own files, which UIs load separately."""
        return og.bfl_flux(pipe.transformer)

    def image_tokens(self, shape) -> int:
        return (shape[-2] // 2) * (shape[-1] // 2)

    def fixed_conditioning(self, cfg, denoiser) -> dict:
        return {"guidance": torch.tensor(cfg.flow.guidance)} if denoiser.config.get("guidance_embeds") else {}

    def transformer_forward(self, transformer, noisy, t, encoder_hidden_states=None, pooled_projections=None,
                            guidance=None):
        b, _, h, w = noisy.shape
        if guidance is not None:
            guidance = guidance.to(noisy.device, torch.float32).expand(b)
        out = transformer(hidden_states=pack(noisy), timestep=t / 1000, guidance=guidance,
                          pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                          txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=noisy.device),
                          img_ids=image_ids(h, w, noisy.device), return_dict=False)[0]
        return unpack(out, h, w)


FLUX = FluxFamily()
