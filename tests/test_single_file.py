"""Single-file checkpoints of full fine-tunes (families/original.py, Family.single_file_state_dict), read
back by diffusers' own single-file loaders, not by us: every weight of the loaded model must equal the
pipeline's (same dtype, torch.equal: the conversion only renames, fuses and reshapes), every key of the
loaded model must be there, and the file must hold exactly the pipeline's elements (nothing dropped,
nothing twice)."""

from __future__ import annotations

import pytest
import torch

from dreambooth_ray import families, models


def _save(sd: dict, path) -> str:
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return str(path)


def _numel(sd: dict) -> int:
    return sum(v.numel() for v in sd.values())


def assert_same_weights(ours, loaded, what: str) -> None:
    a, b = ours.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b), f"{what}: keys differ"
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {len(bad)} of {len(a)} weights differ, e.g. {bad[:3]}"


def _pipe(ref: str, dtype):
    return models.load_pipeline(ref, torch_dtype=dtype)


def _check_pipeline(pipe, family, config: str, tmp_path, parts: tuple[str, ...]):
    """Convert, save, load with the pipeline class's from_single_file(config=...), compare every part."""
    sd = family.single_file_state_dict(pipe)
    extras = family.single_file_extras(pipe)
    assert set(extras) <= set(sd)
    # Every element of the pipeline's parts is in the file once: a dropped or doubled key changes the count.
    assert _numel({k: v for k, v in sd.items() if k not in extras}) == sum(_numel(getattr(pipe, p).state_dict()) for p in parts)
    path = _save(sd, tmp_path / "model.safetensors")
    dtype = next(pipe.unet.parameters()).dtype
    loaded = family.pipeline_class().from_single_file(path, config=config, torch_dtype=dtype)
    for p in parts:
        assert_same_weights(getattr(pipe, p), getattr(loaded, p), p)
    return sd, loaded


def test_sd_single_file_loads_in_diffusers(tmp_path):
    """SD 1.x layout (CLIP in transformers' layout under cond_stage_model.transformer.), fp16 as exported."""
    pipe = _pipe("tiny", torch.float16)
    sd, loaded = _check_pipeline(pipe, families.SD, models.resolve("tiny"), tmp_path, ("unet", "vae", "text_encoder"))
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in sd
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # LDM's 1x1 conv
    assert "v_pred" not in sd and loaded.scheduler.config.prediction_type == "epsilon"


def test_sd2_layout_v_prediction(tmp_path):
    """An SD 2.x-style model (OpenCLIP text tower: exact GELU) with a v-prediction schedule: the text
    encoder goes under cond_stage_model.model. with fused in_proj, and the file carries `v_pred`.
    diffusers' loader takes the prediction type from config='s scheduler (it ignores `v_pred`, which
    ComfyUI and A1111/Forge read for SDXL), so the config folder here is the exported pipeline's."""
    from diffusers import DDIMScheduler

    pipe = _pipe("tiny", torch.float16)
    pipe.text_encoder.config.hidden_act = "gelu"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    folder = tmp_path / "export"
    pipe.save_pretrained(folder)
    sd, loaded = _check_pipeline(pipe, families.SD, str(folder), tmp_path, ("unet", "vae", "text_encoder"))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd)
    assert sd["v_pred"].numel() == 0
    assert loaded.scheduler.config.prediction_type == "v_prediction"


def test_sdxl_single_file_loads_in_diffusers(tmp_path):
    """SDXL's layout: CLIP-L under conditioner.embedders.0.transformer., OpenCLIP-bigG (fused in_proj,
    text_projection transposed) under conditioner.embedders.1.model.; fp16 as exported. diffusers'
    loader tells the two encoders apart only by width (SDXL's are 768 and 1280 wide); tiny-sdxl's are
    both 32 wide, so it would load the first into both: this tiny SDXL has a 48-wide second encoder."""
    from dreambooth_ray.tiny import build_sdxl_pipeline

    pipe = build_sdxl_pipeline(width_2=48).to(torch.float16)
    folder = tmp_path / "export"
    pipe.save_pretrained(folder)
    sd, _ = _check_pipeline(pipe, families.SDXL, str(folder), tmp_path, ("unet", "vae", "text_encoder", "text_encoder_2"))
    proj = pipe.text_encoder_2.state_dict()["text_projection.weight"]
    assert torch.equal(sd["conditioner.embedders.1.model.text_projection"], proj.T)
    assert "model.diffusion_model.label_emb.0.0.weight" in sd and "v_pred" not in sd


def test_tiny_sdxl_unchanged_by_width_2():
    """build_sdxl_pipeline's default is still the built-in tiny-sdxl, weight for weight."""
    from dreambooth_ray.tiny import build_sdxl_pipeline

    built, shipped = build_sdxl_pipeline(), _pipe("tiny-sdxl", torch.float32)
    for p in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(built, p), getattr(shipped, p), p)
