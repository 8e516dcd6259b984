"""LoRA mode: trained through the same Ray Train + DeepSpeed path, small resumable checkpoints,
exported as a diffusers LoRA that `load_lora_weights` loads and that changes the output."""

import os

import numpy as np
import torch

from dreambooth_ray import export, models, train
from dreambooth_ray.checkpoint import local_copy, read_state
from dreambooth_ray.spec import parse_spec
from dreambooth_ray.storage import Storage

from conftest import tiny_spec


def _bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


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
    url, size = export.save_lora(storage, pipe, ("outputs", "t", "toy"), with_text_encoder=False)
    assert size < unet_bytes / 10 and os.path.exists(os.path.join(url, "pytorch_lora_weights.safetensors"))

    def render(p):
        g = torch.Generator().manual_seed(0)
        return np.asarray(p("a sks toy", num_inference_steps=3, height=32, width=32, generator=g).images[0])

    before = render(base)
    base.load_lora_weights(url)
    assert not np.array_equal(before, render(base)), "the adapter should change the output"
    # `dreambooth-ray eval` loads a LoRA subject the same way: base model plus the exported adapter.
    from dreambooth_ray.eval import load_trained

    assert np.array_equal(render(load_trained(spec, {"lora": url, "base_model": "tiny", "model": url})), render(base))
