"""Model families (families/): each recognised from its pipeline class, one instance each (by name
across processes), unsupported ones refused with the supported list, LoRA defaults per family."""

import copy
from pathlib import Path
import pickle

import pytest

from dreambooth_ray import families, models, preflight
from dreambooth_ray.spec import TrainConfig, parse_spec
from dreambooth_ray.storage import Storage

from conftest import tiny_spec


def test_each_built_in_is_recognised_and_travels_by_name():
    expected = {"tiny": families.SD, "tiny-if": families.IF_STAGE_I, "tiny-sdxl": families.SDXL,
                "tiny-sd3": families.SD3, "tiny-flux": families.FLUX, "tiny-sr": families.IF_STAGE_II,
                "tiny-x4": families.X4}
    for ref, fam in expected.items():
        assert models.family(ref) is fam
        assert pickle.loads(pickle.dumps(fam)) is fam and copy.deepcopy(fam) is fam  # Ray ships it by name
    assert models.family("tiny-x4", role="sr") is families.X4
    with pytest.raises(models.ModelError, match="supported base models"):
        models.family("tiny-x4", role="base")
    with pytest.raises(families.UnsupportedModel) as e:
        families.family_for({"_class_name": "AuraFlowPipeline"})
    assert str(e.value) == ("a AuraFlowPipeline is not supported; supported base models: StableDiffusionPipeline "
                            "(Stable Diffusion 1.x/2.x), IFPipeline (DeepFloyd IF stage I), "
                            "StableDiffusionXLPipeline (Stable Diffusion XL), StableDiffusion3Pipeline (Stable "
                            "Diffusion 3/3.5), FluxPipeline (Flux.1)")
    assert preflight.SR_PIPELINES == {"IFSuperResolutionPipeline": "DeepFloyd IF stage II",
                                      "StableDiffusionUpscalePipeline": "Stable Diffusion x4 upscaler"}


def test_lora_targets_default_to_the_familys(tmp_path, toy_images):
    """IF's T5 has no q_proj: with the targets left unset, its own projections (q, k, v, o) are adapted;
    targets a spec names are used as named."""
    parts = models.load_components("tiny-if")
    families.IF_STAGE_I.add_lora(parts, TrainConfig(method="lora", lora={"text_encoder": True}))
    adapted = {n.rsplit(".", 3)[0].rsplit(".", 1)[1] for n, p in parts["text_encoder"].named_parameters()
               if p.requires_grad}
    assert adapted == {"q", "k", "v", "o"}
    spec = tiny_spec(str(tmp_path / "s"), str(toy_images), model="tiny-if", train={"method": "lora",
                                                                                  "lora": {"text_encoder": True}})
    preflight.check(parse_spec(spec), Storage(str(tmp_path / "s")))
    spec["train"]["lora"]["text_encoder_modules"] = ["q_proj"]
    with pytest.raises(preflight.PreflightError, match="target module 'q_proj' is not in this model"):
        preflight.check(parse_spec(spec), Storage(str(tmp_path / "s")))


@pytest.mark.parametrize("ref,role", [("tiny-if", "base"), ("tiny-sr", "sr")])
def test_if_trains_on_the_prompt_states_its_pipeline_renders_with(ref, role):
    """IF's tokenizer is T5's (model_index.json names it): "a sks dog" is three pieces, not the
    `<unk> s k <unk> d o <unk>` a CLIPTokenizer makes of T5's files, and training's frozen prompt
    states equal IFPipeline.encode_prompt's (77 tokens with the padding mask, not T5's 512)."""
    import torch
    from diffusers import DiffusionPipeline

    path = models.resolve(ref)
    assert DiffusionPipeline.load_config(path)["tokenizer"][1] == "T5Tokenizer"  # the built-in ships IF's kind
    parts = models.load_sr_components(ref) if role == "sr" else models.load_components(ref)
    fam = parts["family"]
    assert parts["tokenizer"].tokenize("a sks dog") == ["\u2581a", "\u2581sks", "\u2581dog"]
    prompts = ["a sks dog", "a dog on the beach"]
    inputs = fam.prompt_inputs(parts, prompts)
    assert inputs["input_ids"].shape == (2, 77) and inputs["attention_mask"][0].sum() == 4  # 3 pieces + </s>
    ours = fam.encode_frozen(fam.encoders(parts), inputs, torch.device("cpu"))["encoder_hidden_states"]
    pipe = models.load_pipeline(ref, torch_dtype=torch.float32)
    theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu", clean_caption=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_export_precision_defaults_to_the_familys_and_a_16_bit_export_loads_plainly(tmp_path):
    """fp16 for the UNet families, bf16 for SD3 and Flux (fp16 overflows their activations); a spec's
    choice wins. A 16-bit export keeps 16-bit files, and `DiffusionPipeline.from_pretrained(path)` with
    no dtype renders on a CPU (every part fp32: transformers would otherwise keep the encoder at 16 bits
    beside diffusers' fp32 UNet, and the first matmul fails)."""
    import safetensors.torch
    import torch
    from diffusers import DiffusionPipeline

    from dreambooth_ray import export

    def spec(model, **train):
        return parse_spec(tiny_spec(str(tmp_path / "s"), str(tmp_path), model=model, train=train))

    assert {m: export.export_dtype(spec(m)) for m in ("tiny", "tiny-sdxl", "tiny-if", "tiny-sd3", "tiny-flux")} == {
        "tiny": "fp16", "tiny-sdxl": "fp16", "tiny-if": "fp16", "tiny-sd3": "bf16", "tiny-flux": "bf16"}
    assert export.export_dtype(spec("tiny-flux", export_dtype="fp32")) == "fp32"
    sr = parse_spec(tiny_spec(str(tmp_path / "s"), str(tmp_path), model="tiny-if",
                              sr={"enabled": True, "model": "tiny-sr", "output_resolution": 64}))
    assert export.export_dtype(sr, "sr") == "fp16"

    pipe = models.load_pipeline("tiny-sdxl", torch_dtype=torch.float16)
    url = export.save(Storage(str(tmp_path / "out")), pipe, ("job", "subject"))
    for part in ("unet", "text_encoder", "text_encoder_2"):
        (weights,) = (Path(url) / part).glob("*.safetensors")
        assert {v.dtype for v in safetensors.torch.load_file(weights).values()} == {torch.float16}
    plain = DiffusionPipeline.from_pretrained(url)
    assert {getattr(plain, n).dtype for n in ("unet", "vae", "text_encoder", "text_encoder_2")} == {torch.float32}
    assert plain("a sks toy", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)
    half = DiffusionPipeline.from_pretrained(url, torch_dtype=torch.float16)
    assert {getattr(half, n).dtype for n in ("unet", "vae", "text_encoder", "text_encoder_2")} == {torch.float16}
