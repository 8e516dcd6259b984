"""LoRA mode: trained through the same Ray Train + DeepSpeed path, small resumable checkpoints,
exported as a diffusers LoRA that holds the trained adapters and that `load_lora_weights` loads."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dreambooth_ray import export, models, train
from dreambooth_ray.checkpoint import consolidated_state_dict, local_copy, read_state
from dreambooth_ray.spec import parse_spec
from dreambooth_ray.storage import Storage

from conftest import tiny_spec


def _bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# peft's parameter names (the checkpoint's) -> diffusers' LoRA names (the exported file's): A is the down
# projection, B the up one.
PEFT_TO_DIFFUSERS = {".lora_A.default.weight": ".lora.down.weight", ".lora_B.default.weight": ".lora.up.weight"}


def test_lora_trains_resumes_exports_and_loads(ray_cluster, tmp_path, toy_images):
    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(toy_images), prior={"enabled": False},
                                train={"method": "lora", "lora": {"rank": 4}, "learning_rate": 1e-2,
                                       "num_workers": 2, "zero_stage": 2, "max_failures": 1}))
    storage = Storage(spec.storage)
    res = train.fit(spec, spec.subjects[0], storage, "lora", None, use_gpu=False, fault=("raise", 2))

    base = models.load_pipeline("tiny")
    unet_bytes = sum(p.numel() * 4 for p in base.unet.parameters())
    with local_copy(res.checkpoint) as d:
        assert read_state(d) == {"step": 4, "started_at": 2, "world_size": 2}  # resumed from the LoRA checkpoint
        assert _bytes(d) < unet_bytes / 4, "a LoRA checkpoint holds adapters and their optimizer state only"
        pipe = export.trained_pipeline(spec, d)
        trained = consolidated_state_dict(d)
    url, size = export.save_lora(storage, pipe, ("outputs", "t", "toy"), with_text_encoder=False)
    assert size < unet_bytes / 10

    # The exported adapter is the trained one, tensor for tensor, under diffusers' names.
    exported = load_file(os.path.join(url, "pytorch_lora_weights.safetensors"))
    expected = {}
    for k, v in trained.items():
        suffix = next(s for s in PEFT_TO_DIFFUSERS if k.endswith(s))  # the checkpoint holds adapters only
        assert k.startswith("unet.")
        expected[k.removesuffix(suffix) + PEFT_TO_DIFFUSERS[suffix]] = v
    assert len(expected) == 64  # A and B of q, k, v, out in the tiny UNet's 8 attention layers
    assert sorted(exported) == sorted(expected)
    unequal = [k for k in expected if not torch.equal(exported[k].float(), expected[k])]
    assert not unequal, f"exported adapter differs from the checkpoint in {unequal[:3]}"
    # Trained: peft's gaussian init starts every up projection at 0, and lr 1e-2 moved each.
    assert all(v.abs().max() > 1e-3 for k, v in expected.items() if k.endswith(".lora.up.weight"))

    def render(p):
        g = torch.Generator().manual_seed(0)
        return np.asarray(p("a sks toy", num_inference_steps=3, height=32, width=32, generator=g).images[0])

    # The base model with the exported adapter renders what the trained pipeline (the checkpoint's adapters
    # in peft layers) renders, bit for bit; and not what the base model alone renders.
    before = render(base)
    base.load_lora_weights(url)
    after = render(base)
    assert np.array_equal(after, render(pipe)) and not np.array_equal(before, after)
    # `dreambooth-ray eval` loads a LoRA subject the same way: base model plus the exported adapter.
    from dreambooth_ray.eval import load_trained

    assert np.array_equal(render(load_trained(spec, {"lora": url, "base_model": "tiny", "model": url})), after)


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_exported_lora_loads_with_the_trained_scale(tmp_path, alpha):
    """The adapter's output scale (lora.alpha / lora.rank) survives the export: the base model with the
    exported LoRA computes what the model the adapter was trained in computes."""
    from dreambooth_ray.engine import add_lora
    from dreambooth_ray.spec import TrainConfig

    trained = models.load_pipeline("tiny")
    add_lora(trained.unet, trained.text_encoder, TrainConfig(method="lora", lora={"rank": 4, "alpha": alpha}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # what training does to the up projections, which peft starts at 0
        for n, p in trained.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    url, _ = export.save_lora(Storage(str(tmp_path)), trained, ("out",), with_text_encoder=False)
    loaded = models.load_pipeline("tiny")
    loaded.load_lora_weights(url)
    x, t, text = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        want, got = trained.unet(x, t, text).sample, loaded.unet(x, t, text).sample
        trained.unet.disable_adapters()
        assert (trained.unet(x, t, text).sample - want).abs().max() > 0.05  # the adapter matters (measured 0.16)
    assert torch.equal(got, want), (got - want).abs().max()  # measured: bit-identical
