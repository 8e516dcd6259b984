"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): an MMDiT transformer trained with flow matching.

Three text encoders, as StableDiffusion3Pipeline.encode_prompt combines them: the two CLIP encoders'
penultimate hidden states side by side, zero-padded to T5's width, then T5's states after them along
the sequence; the pooled conditioning is both CLIP encoders' projected embeddings side by side.
The fixed timestep shift (3.0 for SD3) comes from the scheduler config (families/flow.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import original as og
from .flow import FlowMatchingFamily


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    title = "Stable Diffusion 3/3.5"
    pipeline = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    vae_fp32 = True
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    prompt_keys = ("input_ids", "input_ids_2", "input_ids_3")
    clip_encoders = ("text_encoder", "text_encoder_2")
    t5 = "text_encoder_3"
    max_sequence_length = 256
    tags = ("sd3", "sd3-diffusers")

    def architecture(self, pipe) -> str:
        return "stable-diffusion-3"  # kohya's id for every SD3 / 3.5 size

    def kohya_base_version(self, pipe) -> str:
        return "sd3"

    def encode(self, encoders: dict, input_ids, input_ids_2, input_ids_3=None, t5_states=None) -> dict:
        states, pooled = [], []
        for te, ids in ((encoders["text_encoder"], input_ids), (encoders["text_encoder_2"], input_ids_2)):
            out = te(ids, output_hidden_states=True)
            pooled.append(out[0])  # CLIPTextModelWithProjection: the projected pooled embedding
            states.append(out.hidden_states[-2])
        if t5_states is None:
            t5_states = self.t5_states(encoders[self.t5], input_ids_3)
        clip = torch.cat(states, dim=-1)
        clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5_states.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    single_file_uis = "ComfyUI (with the base model's text encoders)"

    def single_file_howto(self, file: str) -> list[str]:
        return [f"- ComfyUI: copy `{file}` into `ComfyUI/models/checkpoints/` (a *Load Checkpoint* node) and load "
                "the base model's text encoders (clip_l, clip_g, t5xxl) with a *TripleCLIPLoader*."]

    def single_file_state_dict(self, pipe) -> dict:
        """As sd3_medium.safetensors: the MMDiT in SD3's own layout under `model.diffusion_model.` and the
        VAE in LDM's under `first_stage_model.` (ComfyUI's checkpoint loader, diffusers' from_single_file);
        no text encoders, which UIs load from their own files (clip_l, clip_g, t5xxl)."""
        return {**og.prefixed("model.diffusion_model.", og.sd3_mmdit(pipe.transformer)),
                **og.prefixed("first_stage_model.", og.ldm_vae(pipe.vae))}

    def transformer_forward(self, transformer, noisy, t, encoder_hidden_states=None, pooled_projections=None):
        return transformer(hidden_states=noisy, timestep=t, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections, return_dict=False)[0]


SD3 = StableDiffusion3()
