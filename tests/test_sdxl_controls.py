"""Masks and per-photo captions on SDXL (tiny-sdxl), whose UNet also conditions on the pooled text
embedding and per-row time ids: each drawn row's mask, prompt and time ids are its own photo's (issue #34
follow-up; the tiny-sd tests are test_masks.py and test_captions.py)."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ray import engine, models
from dreambooth_ray.data import step_generator
from dreambooth_ray.families.sdxl import time_ids
from dreambooth_ray.images import read_images
from dreambooth_ray.spec import Subject, TrainConfig

CPU = torch.device("cpu")
RES = 32
SIZES = {"a": (98, 64), "b": (64, 96), "c": (80, 80)}  # (w, h): each photo its own crop, so its own time ids
CAPTIONS = {"a": "a photo of {identifier} {class_noun} on a table", "b": "{identifier} {class_noun}, studio light"}


@pytest.fixture(scope="module")
def sdxl_parts():
    return models.load_components("tiny-sdxl")


def _photos(root):
    """a: cut out (the left half of the photo transparent), b: masks/b.png (its bottom third black),
    c: no mask and no caption; a and b captioned."""
    rng = np.random.default_rng(0)
    (root / "masks").mkdir(parents=True)
    for stem, (w, h) in SIZES.items():
        px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if stem == "a":
            alpha = np.full((h, w, 1), 255, np.uint8)
            alpha[:, : w // 2] = 0
            Image.fromarray(np.concatenate([px, alpha], -1), "RGBA").save(root / "a.png")
        else:
            Image.fromarray(px).save(root / f"{stem}.png")
        if stem in CAPTIONS:
            (root / f"{stem}.txt").write_text(CAPTIONS[stem])
    m = np.full((96, 64), 255, np.uint8)
    m[64:] = 0
    Image.fromarray(m, "L").save(root / "masks" / "b.png")
    photos, bad = read_images(str(root), RES)
    assert bad == [] and [p.name for p in photos] == ["a.png", "b.png", "c.png"]
    return photos


def _drawn(cfg, n_photos):
    """The step's photo and flip per subject row (DreamBoothData._pick's draws from the step's generator)."""
    g = step_generator(cfg.seed, 0, 0, 0)
    return torch.randint(n_photos, (cfg.batch_size,), generator=g).tolist(), \
        (torch.rand(cfg.batch_size, generator=g) < 0.5).tolist()


def _cells(mask: np.ndarray, f: int = 2) -> np.ndarray:
    """Area average over f x f pixel blocks, by reshaping (not the code under test's pooling)."""
    h, w = mask.shape
    return mask.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


@pytest.mark.parametrize("cache_latents", [True, False])
def test_masked_cells_get_zero_gradient_on_sdxl(group, sdxl_parts, tmp_path, cache_latents):
    """The UNet's prediction gets zero gradient exactly on the latent cells the drawn photo's mask (flipped
    with it) leaves out, nonzero on the rest of the subject rows and on every class row; the time ids are
    still the drawn photo's."""
    photos = _photos(tmp_path / "s")
    cfg = TrainConfig(resolution=RES, mixed_precision="fp32", learning_rate=1e-3, random_flip=True, batch_size=3,
                      cache_latents=cache_latents, seed=18)
    idx, flip = _drawn(cfg, len(photos))
    assert idx == [1, 0, 2] and flip == [True, True, False]  # every photo, the cut-out one flipped (seed 18)
    parts, seen = copy.deepcopy(sdxl_parts), {}

    def keep(module, args, kwargs, out):
        out.sample.retain_grad()
        seen.update(pred=out.sample, time_ids=kwargs["added_cond_kwargs"]["time_ids"])

    parts["unet"].register_forward_hook(keep, with_kwargs=True)
    classes = [Image.new("RGB", (RES, RES), (128, 128, 128))]
    eng = engine.build(parts, [p.image for p in photos], classes, "a sks toy", "a toy", cfg, 1.0, CPU,
                       geometry=[p.geometry for p in photos], masks=[p.mask for p in photos])
    eng.step(0)
    grad = seen["pred"].grad
    assert grad.shape == (6, 4, 16, 16)
    for row, (i, f) in enumerate(zip(idx, flip)):
        m = photos[i].mask if photos[i].mask is not None else np.ones((RES, RES), np.float32)
        cells = torch.from_numpy(_cells(m[:, ::-1] if f else m))
        zero = (grad[row] == 0).all(dim=0)
        assert torch.equal(zero, cells == 0), (row, photos[i].name, f)
        assert seen["time_ids"][row].tolist() == time_ids(photos[i].geometry, RES, f)
    assert int((grad[:3] == 0).all(dim=1).sum()) == 144  # b 32 cells, a 112, c none: 144 of 768
    assert not (grad[3:] == 0).any()  # the prior rows are not masked
    eng.ds.destroy()


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_each_row_gets_its_captions_conditioning_on_sdxl(group, sdxl_parts, tmp_path, train_text_encoder):
    """A row drawn from a captioned photo gets, as hidden states and pooled embedding, exactly what an engine
    whose instance prompt is that caption gives its subject rows; an uncaptioned photo's row the subject's
    instance prompt's; class rows the class prompt's. Time ids stay the drawn photo's."""
    photos = _photos(tmp_path / "s")
    subject = Subject(name="toy", images=str(tmp_path / "s"), **{"class": "toy"}, identifier="zwx")
    captions = [subject.prompt(p.caption) if p.caption else None for p in photos]
    assert captions == ["a photo of zwx toy on a table", "zwx toy, studio light", None]
    cfg = TrainConfig(resolution=RES, mixed_precision="fp32", learning_rate=1e-3, random_flip=True, batch_size=3,
                      seed=18, train_text_encoder=train_text_encoder)
    idx, flip = _drawn(cfg, len(photos))
    classes = [Image.new("RGB", (RES, RES), (128, 128, 128))]

    def conditioning(instance_text, **kw):
        parts, seen = copy.deepcopy(sdxl_parts), {}
        parts["unet"].register_forward_pre_hook(
            lambda m, a, k: seen.update(states=a[2].detach().clone(), **{
                n: v.detach().clone() for n, v in k["added_cond_kwargs"].items()}), with_kwargs=True)
        eng = engine.build(parts, [p.image for p in photos], classes, instance_text, subject.class_text, cfg, 1.0,
                           CPU, geometry=[p.geometry for p in photos], **kw)
        eng.step(0)  # the conditioning of step 0's forward: the weights it reads are the base model's
        eng.ds.destroy()
        return seen

    got = conditioning(subject.instance_text, captions=captions)
    for row, (i, f) in enumerate(zip(idx, flip)):
        want = conditioning(captions[i] or subject.instance_text)  # every subject row that prompt
        for k in ("states", "text_embeds"):
            # Measured: max |diff| 0 (the same encoders on the same ids); every row given a's caption: fails.
            torch.testing.assert_close(got[k][row], want[k][0], rtol=0, atol=1e-6)
            torch.testing.assert_close(got[k][3 + row], want[k][3], rtol=0, atol=1e-6)  # class rows
        assert got["time_ids"][row].tolist() == time_ids(photos[i].geometry, RES, f)
    assert len({tuple(got["text_embeds"][r].tolist()) for r in range(3)}) == 3  # three distinct prompts drawn


def test_stored_frozen_inputs_carry_sdxl_masks_and_captions(group, sdxl_parts, tmp_path):
    """A training worker's path (train.py): the encode task's pools and caption conditioning, stored and read
    back (encode.save / load), give the step the engine computing them in-process gives, and not the step
    without the captions or without the masks."""
    from conftest import tiny_spec

    from dreambooth_ray import encode
    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.storage import Storage

    photos = _photos(tmp_path / "s")
    subject = Subject(name="toy", images=str(tmp_path / "s"), **{"class": "toy"}, identifier="zwx")
    captions = [subject.prompt(p.caption) if p.caption else None for p in photos]
    masks, images = [p.mask for p in photos], [p.image for p in photos]
    cfg = TrainConfig(resolution=RES, mixed_precision="fp32", learning_rate=1e-3, random_flip=True, batch_size=3,
                      seed=18)
    classes = [Image.new("RGB", (RES, RES), (128, 128, 128))]
    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(tmp_path / "s"), model="tiny-sdxl"))
    storage = Storage(spec.storage)
    encode.save(storage, spec, "run", engine.frozen_inputs(copy.deepcopy(sdxl_parts), images, classes,
                                                           subject.instance_text, subject.class_text, cfg, CPU,
                                                           masks, captions))
    stored = encode.load(storage, spec, "run")
    assert set(stored.conditioning) == {"encoder_hidden_states", "text_embeds"} and stored.masks is not None

    def step(**kw):
        parts = copy.deepcopy(sdxl_parts)
        if "frozen" in kw:  # a worker loads neither the VAE nor the frozen encoders
            parts.update(vae=None, text_encoder=None, text_encoder_2=None)
        eng = engine.build(parts, images, classes, subject.instance_text, subject.class_text, cfg, 1.0, CPU,
                           geometry=[p.geometry for p in photos], **kw)
        out = eng.step(0).tolist()
        eng.ds.destroy()
        return out

    worker = step(frozen=stored, masks=masks, captions=captions)
    here = step(masks=masks, captions=captions)
    # Measured: equal to the last bit (the same tensors, read back). Subject loss 1.107482; without the
    # captions 1.107972 (4.9e-4 away), without the masks 1.108786 (1.3e-3): the bounds below are half those.
    assert worker == here, (worker, here)
    assert abs(step(masks=masks)[1] - here[1]) > 2.5e-4, "captions changed nothing"
    assert abs(step(captions=captions)[1] - here[1]) > 6e-4, "masks changed nothing"
