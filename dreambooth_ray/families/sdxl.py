"""Stable Diffusion XL (StableDiffusionXLPipeline).

Two CLIP text encoders and tokenizers: the UNet's cross-attention reads both encoders' penultimate
hidden states side by side, and its added conditioning ("text_time") the pooled, projected embedding
of the second encoder and six time ids per image: (original height, original width, crop top, crop
left, target height, target width). The original size is the real photo's, before resizing and
cropping; the crop offsets are where the training crop sits in the resized photo (mirrored for the
flipped variant). Class images are generated at the target size, uncropped: (res, res, 0, 0, res, res),
what the pipeline itself uses at inference. The VAE overflows in fp16, so images are encoded in fp32.
"""

from __future__ import annotations

import torch

from . import original as og
from .base import Family, kohya_lora


def time_ids(geometry, resolution: int, flipped: bool = False) -> list[float]:
    """SDXL's add_time_ids for one training image. `geometry`: (original h, original w, crop top,
    crop left, resized h, resized w) of a subject photo, or None for an image made at the target size."""
    if geometry is None:
        return [resolution, resolution, 0, 0, resolution, resolution]
    oh, ow, top, left, _, rw = geometry
    if flipped:  # the same crop of the mirrored photo starts this far from its left edge
        left = rw - left - resolution
    return [oh, ow, top, left, resolution, resolution]


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline = "StableDiffusionXLPipeline"
    vae_fp32 = True
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    added_conditioning = ("text_time",)
    prompt_keys = ("input_ids", "input_ids_2")
    row_key = "time_ids"
    tags = ("stable-diffusion-xl",)

    def architecture(self, pipe) -> str:
        return "stable-diffusion-xl-v1-base"

    def kohya_base_version(self, pipe) -> str:
        return "sdxl_base_v1-0"

    def kohya_lora_state_dict(self, pipe, with_text_encoder: bool):
        """kohya's SDXL layout: the UNet under sgm's (LDM) module names, the encoders as lora_te1_ / lora_te2_."""
        out = kohya_lora(pipe.unet, "lora_unet", og.ldm_unet_names(pipe.unet))
        if with_text_encoder:
            out.update(kohya_lora(pipe.text_encoder, "lora_te1"))
            out.update(kohya_lora(pipe.text_encoder_2, "lora_te2"))
        return out

    def prompt_inputs(self, parts: dict, prompts: list[str]) -> dict:
        return {"input_ids": self.token_ids(parts["tokenizer"], prompts)[0],
                "input_ids_2": self.token_ids(parts["tokenizer_2"], prompts)[0]}

    def encode(self, encoders: dict, input_ids, input_ids_2) -> dict:
        """As StableDiffusionXLPipeline.encode_prompt: penultimate hidden states of both encoders,
        concatenated; the pooled embedding of the last one that has one (the projection model)."""
        states, pooled = [], None
        for te, ids in ((encoders["text_encoder"], input_ids), (encoders["text_encoder_2"], input_ids_2)):
            out = te(ids, output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}

    def row_conditioning(self, geometry: list, resolution: int, random_flip: bool) -> torch.Tensor:
        flips = (False, True) if random_flip else (False,)
        return torch.tensor([[time_ids(g, resolution, f) for f in flips] for g in geometry], dtype=torch.float32)

    def unet_forward(self, unet, noisy, t, encoder_hidden_states=None, class_labels=None, text_embeds=None,
                     time_ids=None):
        if time_ids is None or text_embeds is None:
            raise ValueError("an SDXL UNet needs the pooled text embedding and the time ids")
        return unet(noisy, t, encoder_hidden_states,
                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids.to(noisy.device)}).sample

    def config_problems(self, read, unet: dict) -> list[str]:
        """The UNet's added-conditioning input must be 6 time-id embeddings plus the pooled text."""
        problems = super().config_problems(read, unet)
        if problems:
            return problems
        pooled = (read("text_encoder_2/config.json") or {}).get("projection_dim")
        per_id, width = unet.get("addition_time_embed_dim"), unet.get("projection_class_embeddings_input_dim")
        if pooled and per_id and width and width != 6 * per_id + pooled:
            return [f"model: the UNet's added-conditioning input is {width} wide, not 6 time ids x {per_id} + the "
                    f"second text encoder's {pooled}-wide pooled embedding = {6 * per_id + pooled}"]
        return []

    def single_file_state_dict(self, pipe) -> dict:
        """SDXL's original (sgm) layout: CLIP-L in transformers' layout, OpenCLIP-bigG in its own."""
        return {**og.prefixed("model.diffusion_model.", og.ldm_unet(pipe.unet)),
                **og.prefixed("first_stage_model.", og.ldm_vae(pipe.vae)),
                **og.prefixed("conditioner.embedders.0.transformer.", og.hf_clip(pipe.text_encoder)),
                **og.prefixed("conditioner.embedders.1.model.", og.open_clip(pipe.text_encoder_2)),
                **self.single_file_extras(pipe)}

    def single_file_extras(self, pipe) -> dict:
        return og.v_prediction_markers(pipe.scheduler)

    def text_width(self, read) -> int | None:
        widths = [(read(f"{te}/config.json") or {}).get("hidden_size") for te in self.text_encoders]
        return None if None in widths else sum(widths)


SDXL = StableDiffusionXL()
