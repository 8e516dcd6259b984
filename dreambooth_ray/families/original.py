"""Diffusers weights in the original (pre-diffusers) key layouts that ComfyUI, AUTOMATIC1111, Forge and
InvokeAI load as one file: the LDM layout of Stable Diffusion and SDXL (UNet `model.diffusion_model.*`,
VAE `first_stage_model.*`, CLIP in transformers' layout or OpenCLIP's), SD3's MMDiT and BFL's Flux.

Each function takes a diffusers module's state dict and returns the original keys, tensors untouched
(same dtype; fused q/k/v and the VAE's 1x1-conv attention are the only new tensors). A key no rule
covers is an error, never dropped: a UI would load the file with that weight at its random init.
The reverse of diffusers' loaders/single_file_utils.py, which the tests load our files with.
"""

from __future__ import annotations

import torch

# ---- shared ----------------------------------------------------------------------------------------


def _renamed(sd: dict, table: dict[str, tuple[str, dict]], what: str) -> dict:
    """Each key's longest matching diffusers prefix -> (original prefix, renames of the rest)."""
    out = {}
    prefixes = sorted(table, key=len, reverse=True)
    for k, v in sd.items():
        p = next((p for p in prefixes if k.startswith(p)), None)
        if p is None:
            raise ValueError(f"{what}: no original-layout name for {k!r}")
        new, renames = table[p]
        rest = k[len(p):]
        for a, b in renames.items():
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        out[new + rest] = v
    return out


def prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous is (scale, shift); the original adaLN is (shift, scale)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# ---- Stable Diffusion / SDXL (LDM) -------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def ldm_unet(unet) -> dict:
    """A UNet2DConditionModel as LDM's openaimodel.UNetModel (`model.diffusion_model.` left to the caller).
    Input block k = (down block i, layer j) with k = i * (L + 1) + j + 1 (block 0 is conv_in, each
    downsampler takes a slot); output blocks run L + 1 per up block, the upsampler after its attention."""
    sd = unet.state_dict()
    return _renamed(sd, _ldm_unet_table(unet, sd), "unet")


def ldm_unet_names(unet):
    """diffusers module path -> LDM's, for this UNet (kohya's SDXL LoRA names its modules so)."""
    table = _ldm_unet_table(unet, unet.state_dict())
    return lambda name: next(iter(_renamed({name + ".": None}, table, "unet")))[:-1]


def _ldm_unet_table(unet, sd: dict) -> dict:
    cfg = unet.config
    L = cfg.layers_per_block
    if not isinstance(L, int):
        raise ValueError(f"unet: layers_per_block {L!r} per block has no LDM layout (one number expected)")
    t = {"time_embedding.linear_1.": ("time_embed.0.", {}), "time_embedding.linear_2.": ("time_embed.2.", {}),
         "add_embedding.linear_1.": ("label_emb.0.0.", {}), "add_embedding.linear_2.": ("label_emb.0.2.", {}),
         "conv_in.": ("input_blocks.0.0.", {}), "conv_norm_out.": ("out.0.", {}), "conv_out.": ("out.2.", {}),
         "mid_block.resnets.0.": ("middle_block.0.", _RESNET), "mid_block.attentions.0.": ("middle_block.1.", {}),
         "mid_block.resnets.1.": ("middle_block.2.", _RESNET)}
    for i in range(len(cfg.down_block_types)):
        for j in range(L):
            t[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{i * (L + 1) + j + 1}.0.", _RESNET)
            t[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{i * (L + 1) + j + 1}.1.", {})
        t[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{(i + 1) * (L + 1)}.0.op.", {})
        for j in range(L + 1):
            t[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{i * (L + 1) + j}.0.", _RESNET)
            t[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{i * (L + 1) + j}.1.", {})
        attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
        t[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{i * (L + 1) + L}.{2 if attn else 1}.", {})
    return t


_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def ldm_vae(vae) -> dict:
    """An AutoencoderKL as LDM's (`first_stage_model.` left to the caller): the decoder's up blocks
    numbered from the bottom, the mid-block attention as 1x1 convolutions."""
    sd, n = vae.state_dict(), len(vae.config.up_block_types)
    t = {f"{p}.{a}": (f"{p}.{b}", {}) for p in ("encoder", "decoder")
         for a, b in (("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("conv_norm_out.", "norm_out."))}
    t.update({"quant_conv.": ("quant_conv.", {}), "post_quant_conv.": ("post_quant_conv.", {})})
    for p in ("encoder", "decoder"):
        t[f"{p}.mid_block.attentions.0."] = (f"{p}.mid.attn_1.", _VAE_ATTN)
        for k in range(2):
            t[f"{p}.mid_block.resnets.{k}."] = (f"{p}.mid.block_{k + 1}.", {"conv_shortcut": "nin_shortcut"})
    for i in range(n):
        t[f"encoder.down_blocks.{i}.resnets."] = (f"encoder.down.{i}.block.", {})
        t[f"encoder.down_blocks.{i}.downsamplers.0."] = (f"encoder.down.{i}.downsample.", {})
        t[f"decoder.up_blocks.{i}.resnets."] = (f"decoder.up.{n - 1 - i}.block.", {})
        t[f"decoder.up_blocks.{i}.upsamplers.0."] = (f"decoder.up.{n - 1 - i}.upsample.", {})
    out = {}
    for k, v in _renamed(sd, t, "vae").items():
        k = k.replace(".conv_shortcut.", ".nin_shortcut.")  # inside down/up resnets: "block.J.conv_shortcut"
        if ".mid.attn_1." in k and k.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's AttnBlock projects with 1x1 convolutions
        out[k] = v
    return out


def hf_clip(text_encoder) -> dict:
    """A transformers CLIP text model in transformers 4's layout (`text_model.*`, as the original
    checkpoints store it under `...transformer.`): transformers 5 dropped CLIPTextModel's wrapper."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in text_encoder.state_dict().items()}


_OPEN_CLIP = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.",
              "self_attn.out_proj.": "attn.out_proj."}


def open_clip(text_encoder) -> dict:
    """A CLIP text model in OpenCLIP's layout (SD2's `cond_stage_model.model.`, SDXL's
    `conditioner.embedders.1.model.`): q/k/v fused into in_proj, text_projection as x @ P (transposed)."""
    sd = hf_clip(text_encoder)
    out = {}
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    head = "text_model.encoder.layers."
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif k.startswith(head):
            i, rest = k[len(head):].split(".", 1)
            block = f"transformer.resblocks.{i}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    qkv = [sd[f"{head}{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
                continue
            a = next((a for a in _OPEN_CLIP if rest.startswith(a)), None)
            if a is None:
                raise ValueError(f"text encoder: no OpenCLIP name for {k!r}")
            out[block + _OPEN_CLIP[a] + rest[len(a):]] = v
        else:
            raise ValueError(f"text encoder: no OpenCLIP name for {k!r}")
    return out


def is_open_clip(text_encoder) -> bool:
    """OpenCLIP's text towers (SD2's ViT-H, SDXL's bigG) use exact GELU; OpenAI's CLIP (SD1's ViT-L) the
    quick approximation: what tells SD2's layout from SD1's when both convert to CLIPTextModel."""
    return text_encoder.config.hidden_act == "gelu"


def v_prediction_markers(scheduler) -> dict:
    """Empty tensors whose keys say v-prediction (`v_pred`) and a zero-terminal-SNR schedule (`ztsnr`):
    ComfyUI's SDXL loader reads both (its SD2 one guesses from a norm's spread instead); diffusers'
    loader reads neither (the scheduler comes from config=). Nothing else in the file says it."""
    cfg = scheduler.config
    out = {}
    if cfg.get("prediction_type") == "v_prediction":
        out["v_pred"] = torch.tensor([])
        if cfg.get("rescale_betas_zero_snr"):
            out["ztsnr"] = torch.tensor([])
    return out


# ---- SD3 (MMDiT) ------------------------------------------------------------------------------------


def _qkv(sd: dict, pre: str, names=("to_q", "to_k", "to_v")) -> dict:
    return {kind: torch.cat([sd.pop(f"{pre}{n}.{kind}") for n in names], dim=0) for kind in ("weight", "bias")}


def _take(sd: dict, out: dict, pairs: dict) -> None:
    """Move weight and bias (or `.weight`-only norms) of each diffusers module to its original name."""
    for new, old in pairs.items():
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in sd:
                out[f"{new}.{kind}"] = sd.pop(f"{old}.{kind}")


def _done(sd: dict, what: str) -> None:
    if sd:
        raise ValueError(f"{what}: no original-layout name for {sorted(sd)[:5]}")


def sd3_mmdit(transformer) -> dict:
    """An SD3Transformer2DModel as SD3's MMDiT (`model.diffusion_model.` left to the caller): q/k/v
    fused per stream; the last block's context stream, diffusers' continuous AdaLN, back to (shift, scale)."""
    sd = dict(transformer.state_dict())
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    _take(sd, out, {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
                    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
                    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
                    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
                    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
                    "final_layer.linear": "proj_out"})
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    for i in range(transformer.config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        pre_only = f"{d}attn.to_add_out.weight" not in sd
        for kind, t in _qkv(sd, f"{d}attn.").items():
            out[f"{o}x_block.attn.qkv.{kind}"] = t
        for kind, t in _qkv(sd, f"{d}attn.", ("add_q_proj", "add_k_proj", "add_v_proj")).items():
            out[f"{o}context_block.attn.qkv.{kind}"] = t
        if f"{d}attn2.to_q.weight" in sd:  # SD3.5's dual-attention blocks
            for kind, t in _qkv(sd, f"{d}attn2.").items():
                out[f"{o}x_block.attn2.qkv.{kind}"] = t
        _take(sd, out, {f"{o}x_block.attn.ln_q": f"{d}attn.norm_q", f"{o}x_block.attn.ln_k": f"{d}attn.norm_k",
                        f"{o}context_block.attn.ln_q": f"{d}attn.norm_added_q",
                        f"{o}context_block.attn.ln_k": f"{d}attn.norm_added_k",
                        f"{o}x_block.attn2.ln_q": f"{d}attn2.norm_q", f"{o}x_block.attn2.ln_k": f"{d}attn2.norm_k",
                        f"{o}x_block.attn.proj": f"{d}attn.to_out.0", f"{o}context_block.attn.proj": f"{d}attn.to_add_out",
                        f"{o}x_block.attn2.proj": f"{d}attn2.to_out.0",
                        f"{o}x_block.adaLN_modulation.1": f"{d}norm1.linear",
                        f"{o}x_block.mlp.fc1": f"{d}ff.net.0.proj", f"{o}x_block.mlp.fc2": f"{d}ff.net.2",
                        f"{o}context_block.mlp.fc1": f"{d}ff_context.net.0.proj",
                        f"{o}context_block.mlp.fc2": f"{d}ff_context.net.2"})
        for kind in ("weight", "bias"):
            t = sd.pop(f"{d}norm1_context.linear.{kind}")
            out[f"{o}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(t) if pre_only else t
    _done(sd, "transformer")
    return out


# ---- Flux (BFL) -------------------------------------------------------------------------------------


def bfl_flux(transformer) -> dict:
    """A FluxTransformer2DModel in BFL's layout (flux1-dev.safetensors): q/k/v fused per stream; a
    single block's q, k, v and MLP input in one `linear1`; the final AdaLN back to (shift, scale)."""
    sd = dict(transformer.state_dict())
    out = {}
    _take(sd, out, {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
                    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
                    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
                    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
                    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
                    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
                    "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"})
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(sd.pop(f"norm_out.linear.{kind}"))
    for i in range(transformer.config.num_layers):
        d, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind, t in _qkv(sd, f"{d}attn.").items():
            out[f"{o}img_attn.qkv.{kind}"] = t
        for kind, t in _qkv(sd, f"{d}attn.", ("add_q_proj", "add_k_proj", "add_v_proj")).items():
            out[f"{o}txt_attn.qkv.{kind}"] = t
        for new, old in (("img_attn.norm.query_norm", "attn.norm_q"), ("img_attn.norm.key_norm", "attn.norm_k"),
                         ("txt_attn.norm.query_norm", "attn.norm_added_q"), ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            out[f"{o}{new}.scale"] = sd.pop(f"{d}{old}.weight")
        _take(sd, out, {f"{o}img_mod.lin": f"{d}norm1.linear", f"{o}txt_mod.lin": f"{d}norm1_context.linear",
                        f"{o}img_attn.proj": f"{d}attn.to_out.0", f"{o}txt_attn.proj": f"{d}attn.to_add_out",
                        f"{o}img_mlp.0": f"{d}ff.net.0.proj", f"{o}img_mlp.2": f"{d}ff.net.2",
                        f"{o}txt_mlp.0": f"{d}ff_context.net.0.proj", f"{o}txt_mlp.2": f"{d}ff_context.net.2"})
    for i in range(transformer.config.num_single_layers):
        d, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind, t in _qkv(sd, f"{d}", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")).items():
            out[f"{o}linear1.{kind}"] = t
        out[f"{o}norm.query_norm.scale"] = sd.pop(f"{d}attn.norm_q.weight")
        out[f"{o}norm.key_norm.scale"] = sd.pop(f"{d}attn.norm_k.weight")
        _take(sd, out, {f"{o}modulation.lin": f"{d}norm.linear", f"{o}linear2": f"{d}proj_out"})
    _done(sd, "transformer")
    return out
