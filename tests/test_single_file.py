"""Single-file checkpoints of full fine-tunes (families/original.py, Family.single_file_state_dict), read
back by diffusers' own single-file loaders, not by us: every weight of the loaded model must equal the
pipeline's (same dtype, torch.equal: the conversion only renames, fuses and reshapes), every key of the
loaded model must be there, and the file must hold exactly the pipeline's elements (nothing dropped,
nothing twice)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dreambooth_ray import families, models
from dreambooth_ray.families import original as og


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


def randomized(*modules):
    """Every parameter drawn afresh: a fresh model's norms are all ones and zeros, where a swapped pair
    (norm1/norm2, ln_q/ln_k) would load unnoticed; a fine-tuned model's are not."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
    return modules[0]


def _pipe(ref: str, dtype, parts=("unet", "vae", "text_encoder")):
    pipe = models.load_pipeline(ref, torch_dtype=dtype)
    randomized(*(getattr(pipe, p) for p in parts))
    return pipe


def _check_pipeline(pipe, family, config: str, tmp_path, parts: tuple[str, ...], **given):
    """Convert, save, load with the pipeline class's from_single_file(config=...), compare every part
    (`given`: components passed in, as for a file without them)."""
    sd = family.single_file_state_dict(pipe)
    extras = family.single_file_extras(pipe)
    assert set(extras) <= set(sd)
    # Every element of the pipeline's parts is in the file once: a dropped or doubled key changes the count.
    assert _numel({k: v for k, v in sd.items() if k not in extras}) == sum(_numel(getattr(pipe, p).state_dict()) for p in parts)
    path = _save(sd, tmp_path / "model.safetensors")
    dtype = next(getattr(pipe, parts[0]).parameters()).dtype
    loaded = family.pipeline_class().from_single_file(path, config=config, torch_dtype=dtype, **given)
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
    randomized(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    folder = tmp_path / "export"
    pipe.save_pretrained(folder)
    sd, _ = _check_pipeline(pipe, families.SDXL, str(folder), tmp_path, ("unet", "vae", "text_encoder", "text_encoder_2"))
    proj = pipe.text_encoder_2.state_dict()["text_projection.weight"]
    assert torch.equal(sd["conditioner.embedders.1.model.text_projection"], proj.T)
    assert "model.diffusion_model.label_emb.0.0.weight" in sd and "v_pred" not in sd


def test_tiny_sdxl_unchanged_by_width_2():
    """build_sdxl_pipeline's default is still the built-in tiny-sdxl, weight for weight."""
    from dreambooth_ray.tiny import build_sdxl_pipeline

    built, shipped = build_sdxl_pipeline(), models.load_pipeline("tiny-sdxl")
    for p in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert_same_weights(getattr(built, p), getattr(shipped, p), p)


def test_sd3_single_file_loads_in_diffusers(tmp_path):
    """tiny-sd3 as sd3_medium.safetensors ships (MMDiT and VAE, bf16 as exported) through
    StableDiffusion3Pipeline.from_single_file; the text encoders are passed in, as diffusers' docs say for
    that file (its loader looks for them in config='s folder under diffusers' weight names, not
    transformers' model.safetensors)."""
    pipe = _pipe("tiny-sd3", torch.bfloat16, ("transformer", "vae"))
    sd, _ = _check_pipeline(pipe, families.SD3, models.resolve("tiny-sd3"), tmp_path, ("transformer", "vae"),
                            **{te: getattr(pipe, te) for te in families.SD3.text_encoders})
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in sd
    assert not any(k.startswith(("first_stage_model.quant_conv", "text_encoders.")) for k in sd)


def test_sd35_blocks_single_file_loads_in_diffusers(tmp_path):
    """SD3.5's additions, absent from tiny-sd3: q/k RMS norms (ln_q, ln_k) and a dual-attention block (attn2)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                               num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
                               pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32, qk_norm="rms_norm",
                               dual_attention_layers=(0,)).to(torch.bfloat16)
    randomized(tr)
    tr.save_config(tmp_path / "cfg" / "transformer")
    sd = og.prefixed("model.diffusion_model.", og.sd3_mmdit(tr))
    assert _numel(sd) == _numel(tr.state_dict())
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in sd
    assert "model.diffusion_model.joint_blocks.1.context_block.attn.ln_k.weight" in sd
    path = _save(sd, tmp_path / "sd35.safetensors")
    loaded = SD3Transformer2DModel.from_single_file(path, config=str(tmp_path / "cfg"), subfolder="transformer",
                                                    torch_dtype=torch.bfloat16)
    assert_same_weights(tr, loaded, "transformer")


def test_flux_single_file_loads_in_diffusers(tmp_path):
    """Flux in BFL's layout through FluxTransformer2DModel.from_single_file. diffusers' converter fixes
    the width at Flux.1's (inner_dim = 3072, MLP ratio 4: it splits a single block's fused linear1 at
    those sizes), so tiny-flux's 32-wide transformer cannot load; this one has Flux.1-dev's widths and
    one double and one single block (0.5 B parameters, bf16 as exported; 6.4-7.8 s and 2.9 GB peak RSS on this 2-core machine)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        tr = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    tr = randomized(tr.to_empty(device="cpu").to(torch.bfloat16))
    tr.save_config(tmp_path / "cfg" / "transformer")
    sd = families.FLUX.single_file_state_dict(SimpleNamespace(transformer=tr))
    assert _numel(sd) == _numel(tr.state_dict())
    assert "double_blocks.0.img_attn.norm.key_norm.scale" in sd and "single_blocks.0.linear1.weight" in sd
    path = _save(sd, tmp_path / "flux.safetensors")
    del sd
    loaded = FluxTransformer2DModel.from_single_file(path, config=str(tmp_path / "cfg"), subfolder="transformer",
                                                     torch_dtype=torch.bfloat16)
    assert_same_weights(tr, loaded, "transformer")


def test_ldm_names_of_sd15_and_sdxl_unets():
    """The LDM names that diffusers' loader cannot check (it takes an up block's upsampler from slot 1 or
    2 alike; ComfyUI and A1111 build the module from the slot), on SD 1.5's and SDXL base's UNet
    architectures (empty, on the meta device), against the names their released checkpoints use."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        sdxl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)

    def sampling(keys):  # the down- and upsamplers' module names
        return sorted(k[:-len(".weight")] for k in keys
                      if k.endswith(".op.weight") or (k.startswith("output_blocks.") and k.endswith(".conv.weight")))

    a, b = og.ldm_unet(sd15), og.ldm_unet(sdxl)
    assert sampling(a) == ["input_blocks.3.0.op", "input_blocks.6.0.op", "input_blocks.9.0.op",
                           "output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"]
    assert sampling(b) == ["input_blocks.3.0.op", "input_blocks.6.0.op", "output_blocks.2.2.conv", "output_blocks.5.2.conv"]
    for k in ("output_blocks.11.0.skip_connection.weight", "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
              "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.bias", "out.2.weight", "time_embed.2.bias"):
        assert k in a, k
    for k in ("input_blocks.8.1.transformer_blocks.9.ff.net.2.weight", "output_blocks.0.1.transformer_blocks.9.attn1.to_q.weight",
              "input_blocks.4.0.skip_connection.weight", "label_emb.0.2.weight", "middle_block.1.transformer_blocks.9.norm3.bias"):
        assert k in b, k
    assert len(a) == len(sd15.state_dict()) and len(b) == len(sdxl.state_dict())


def test_families_without_a_layout_say_so():
    """IF and the SR families have no single-file format a UI loads: an error naming the pipeline."""
    import pytest

    for fam in (families.IF_STAGE_I, families.IF_STAGE_II, families.X4):
        assert type(fam).single_file_state_dict is families.Family.single_file_state_dict
        with pytest.raises(NotImplementedError, match=fam.pipeline):
            fam.single_file_state_dict(None)
