"""Per-photo captions (issue #34, item 6): <photo>.txt beside a photo is its instance prompt template."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ray import engine, models
from dreambooth_ray.data import step_generator
from dreambooth_ray.images import read_images
from dreambooth_ray.spec import Subject, TrainConfig

CPU = torch.device("cpu")
CAPTIONS = {"a": "a photo of {identifier} {class_noun} on a table", "b": "{identifier} {class_noun}, studio light",
            "d": "a photo of {identifier} {class_noun} on a table"}  # d: a's caption again; c: none


def _photos(root):
    rng = np.random.default_rng(0)
    root.mkdir()
    for stem in "abcd":
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{stem}.png")
        if stem in CAPTIONS:
            (root / f"{stem}.txt").write_text(CAPTIONS[stem] + "\n")


@pytest.fixture(scope="module")
def tiny_parts():
    return models.load_components("tiny")


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_each_row_is_conditioned_on_its_photos_caption(group, tiny_parts, tmp_path, train_text_encoder):
    """The conditioning the denoiser gets for each drawn row equals the text encoder's output for that
    row's photo caption (placeholders substituted by hand here, tokenized and encoded independently);
    a photo without a .txt gets the subject's instance prompt, a class row the class prompt. Frozen
    encoders encode each distinct prompt once."""
    _photos(tmp_path / "s")
    photos, bad = read_images(str(tmp_path / "s"), 32)
    assert bad == [] and [p.caption for p in photos] == [CAPTIONS["a"], CAPTIONS["b"], None, CAPTIONS["d"]]
    subject = Subject(name="toy", images=str(tmp_path / "s"), **{"class": "toy"}, identifier="zwx")
    captions = [subject.prompt(p.caption) if p.caption else None for p in photos]
    cfg = TrainConfig(resolution=32, mixed_precision="fp32", learning_rate=1e-3, batch_size=3, seed=3,
                      train_text_encoder=train_text_encoder)
    parts = copy.deepcopy(tiny_parts)
    encoded_rows, seen = [], []
    parts["text_encoder"].register_forward_hook(lambda m, args, out: encoded_rows.append(len(args[0])))
    parts["unet"].register_forward_pre_hook(lambda m, args: seen.append(args[2].detach().clone()))
    classes = [Image.new("RGB", (32, 32), (128, 128, 128))]
    eng = engine.build(parts, [p.image for p in photos], classes, subject.instance_text, subject.class_text, cfg,
                       1.0, CPU, captions=captions)
    if not train_text_encoder:  # 3 distinct instance prompts (a = d) and the class prompt, once
        assert encoded_rows == [4]
    eng.step(0)
    g = step_generator(cfg.seed, 0, 0, 0)
    idx = torch.randint(4, (3,), generator=g).tolist()
    assert idx == [0, 1, 2]  # photos a, b, c (no caption) drawn (seed 3)
    by_hand = {0: "a photo of zwx toy on a table", 1: "zwx toy, studio light", 2: "a zwx toy", 3: "a photo of zwx toy on a table"}
    want_text = [by_hand[i] for i in idx] + ["a toy"] * 3
    tok, te = tiny_parts["tokenizer"], copy.deepcopy(tiny_parts["text_encoder"]).eval()
    ids = tok(want_text, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        want = te(ids)[0]
    got = seen[0]
    # Measured: max |diff| 0 (the same fp32 encoder on the same ids); every row given photo a's caption: fails.
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_unknown_placeholder_in_a_caption_is_named(tmp_path):
    _photos(tmp_path / "s")
    (tmp_path / "s" / "b.txt").write_text("a {identifer} {class_noun}")  # misspelt
    good, bad = read_images(str(tmp_path / "s"), 32)
    assert [p.name for p in good] == ["a.png", "c.png", "d.png"]
    assert bad == [("b.png", f"{tmp_path}/s/b.txt: unknown placeholder(s) ['identifer'] (use {{identifier}} "
                             "and {class_noun})")]
