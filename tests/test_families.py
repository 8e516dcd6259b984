"""Model families (families/): each recognised from its pipeline class, one instance each (by name
across processes), unsupported ones refused with the supported list, LoRA defaults per family."""

import copy
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
