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
