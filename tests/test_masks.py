"""Masked subject loss (issue #34, item 4): a photo's alpha channel or masks/<name> weights the subject
term per latent cell; the prior term stays unmasked."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth_ray import engine, models
from dreambooth_ray.data import step_generator
from dreambooth_ray.images import read_images
from dreambooth_ray.loss import prior_preservation_loss
from dreambooth_ray.spec import TrainConfig

CPU = torch.device("cpu")


def _cells(mask: np.ndarray, f: int) -> np.ndarray:
    """Area average over f x f pixel blocks, by reshaping (not the code under test's pooling)."""
    h, w = mask.shape
    return mask.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def test_masked_pixel_gets_zero_gradient_and_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 3, 4, 4, generator=g, requires_grad=True)  # 2 subject rows, 2 class rows
    target = torch.randn(4, 3, 4, 4, generator=g)
    px = np.ones((2, 8, 8), np.float32)  # pixel masks, 2x the 4x4 grid
    px[0, :, :4] = 0  # row 0: left half background -> cells [:, :2] masked
    px[1, 0, 0] = 0  # row 1: one pixel of cell (0, 0) -> that cell weighs 0.75
    loss, inst, prior = prior_preservation_loss(pred, target, 2, 0.5, torch.from_numpy(px)[:, None])
    loss.backward()
    m = np.stack([_cells(p, 2) for p in px])[:, None]  # [2, 1, 4, 4]
    err = (pred.detach() - target).numpy().astype(np.float64) ** 2
    want = (m * err[:2]).sum() / (m.sum() * 3)  # mean squared error over the subject's cells and channels
    assert inst.item() == pytest.approx(want, rel=1e-6)
    assert prior.item() == pytest.approx(err[2:].mean(), rel=1e-6)  # the prior term is not masked
    grad = pred.grad
    assert torch.all(grad[0, :, :, :2] == 0) and torch.all(grad[0, :, :, 2:] != 0)
    assert torch.all(grad[1] != 0)
    # d inst / d pred = 2 m (pred - target) / (C sum m): a partly masked cell gets 0.75 of the gradient
    d = 2 * m[1, 0, 0, 0] * (pred[1, :, 0, 0] - target[1, :, 0, 0]).detach() / (m.sum() * 3)
    assert torch.allclose(grad[1, :, 0, 0], d.float(), rtol=1e-5)
    # The prior rows' gradient is plain MSE's, times its weight.
    assert torch.allclose(grad[2:], 0.5 * 2 * (pred[2:] - target[2:]).detach() / err[2:].size, rtol=1e-5)
    # An all-ones mask is plain MSE.
    ones = prior_preservation_loss(pred, target, 2, 0.5, torch.ones(2, 1, 8, 8))[1]
    assert ones.item() == pytest.approx(F.mse_loss(pred[:2], target[:2]).item(), rel=1e-6)


def _photos(root, res=32):
    """Two photos of a random scene: one PNG cut out with alpha (its top-left quadrant transparent, a
    half-transparent band), one JPEG with masks/b.png (its right third black). Returns the expected
    masks in [0, 1]."""
    rng = np.random.default_rng(0)
    root.mkdir()
    alpha = np.full((res, res), 255, np.uint8)
    alpha[: res // 2, : res // 2] = 0
    alpha[res - 4 :, :] = 128
    rgba = np.concatenate([rng.integers(0, 256, (res, res, 3), dtype=np.uint8), alpha[..., None]], axis=-1)
    Image.fromarray(rgba, "RGBA").save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(root / "b.jpg", quality=95)
    (root / "masks").mkdir()
    mb = np.full((res, res), 255, np.uint8)
    mb[:, 2 * res // 3 :] = 0
    Image.fromarray(mb, "L").save(root / "masks" / "b.png")
    Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(root / "c.jpg", quality=95)
    return {"a.png": alpha / 255.0, "b.jpg": mb / 255.0, "c.jpg": None}


def test_masks_read_from_alpha_and_masks_folder(tmp_path):
    want = _photos(tmp_path / "s")
    got, bad = read_images(str(tmp_path / "s"), 32)
    assert bad == [] and [p.name for p in got] == ["a.png", "b.jpg", "c.jpg"]  # masks/ holds no photos
    for p in got:
        if want[p.name] is None:
            assert p.mask is None
        else:
            assert np.allclose(p.mask, want[p.name], atol=1 / 255)
    # The cut-out's pixels are still composited onto white; the mask only weights the loss.
    assert np.asarray(got[0].image)[0, 0].tolist() == [255, 255, 255]


def test_bad_masks_are_named(tmp_path):
    _photos(tmp_path / "s")
    Image.new("L", (32, 16), 255).save(tmp_path / "s" / "masks" / "b.png")  # another shape
    Image.new("L", (32, 32), 0).save(tmp_path / "s" / "masks" / "c.jpg")  # no subject
    good, bad = read_images(str(tmp_path / "s"), 32)
    assert [p.name for p in good] == ["a.png"]
    assert bad[0][0] == "b.jpg" and "masks/b.png: mask is 32x16, its photo 32x32" in bad[0][1]
    assert bad[1][0] == "c.jpg" and "masks/c.jpg: the mask has no subject" in bad[1][1]


@pytest.fixture(scope="module")
def tiny_parts():
    return models.load_components("tiny")


@pytest.mark.parametrize("cache_latents", [True, False])
def test_engine_step_weights_the_drawn_rows_masks(group, tiny_parts, tmp_path, cache_latents):
    """engine.build from photos read off disk: the step's subject loss is the drawn rows' error,
    weighted by each drawn photo's mask (flipped with it, area-averaged 2x2 to the 16x16 latent grid
    by reshaping here). The error per cell is read back through the loss itself with one-hot masks
    on the grid, before the step changes the weights."""
    want = _photos(tmp_path / "s")
    photos, _ = read_images(str(tmp_path / "s"), 32)
    cfg = TrainConfig(resolution=32, mixed_precision="fp32", learning_rate=1e-3, random_flip=True, batch_size=2,
                      cache_latents=cache_latents, seed=2)  # draws photos b, a, both flipped
    classes = [Image.new("RGB", (32, 32), (128, 128, 128))]
    eng = engine.build(copy.deepcopy(tiny_parts), [p.image for p in photos], classes, "a sks toy", "a toy", cfg,
                       1.0, CPU, masks=[p.mask for p in photos])

    def draw():  # the step's own draws: the generator and global seed it sets up (masks draw nothing)
        g = step_generator(cfg.seed, 0, 0, 0)
        torch.manual_seed(g.initial_seed() ^ 0x5DEECE66D)
        rows, n = eng.data.batch(cfg.batch_size, g)
        return rows, n, g

    rows, n, g = draw()
    g0 = step_generator(cfg.seed, 0, 0, 0)
    idx = torch.randint(3, (n,), generator=g0).tolist()
    flip = (torch.rand(n, generator=g0) < 0.5).tolist()
    err = torch.zeros(n, 16, 16, dtype=torch.float64)  # mean over channels of (pred - target)^2
    with torch.no_grad():
        for r in range(n):
            for k in range(256):
                onehot = torch.zeros(n, 1, 16, 16)
                onehot[r, 0, k // 16, k % 16] = 1
                rows, n, g = draw()
                err[r, k // 16, k % 16] = eng.loss(eng.ds, rows, n, g, None, onehot)[1].item()
    names = [p.name for p in photos]
    m = []
    for i, f in zip(idx, flip):
        px = want[names[i]] if want[names[i]] is not None else np.ones((32, 32))
        m.append(_cells(px[:, ::-1] if f else px, 2))
    m = torch.tensor(np.stack(m))
    expect = (m * err).sum() / m.sum()
    loss, inst, prior = eng.step(0).tolist()
    assert inst == pytest.approx(expect.item(), rel=1e-5)
    # Measured: 1.15139 both ways (cached latents or pixels); unmasked 1.128; masks not flipped with their
    # photos 1.1256 (this test then fails); rel 1e-5 is float32 summation-order slack.
    assert idx == [1, 0] and flip == [True, True]
    assert abs(err.mean().item() - inst) > 1e-2


def test_masks_and_captions_enter_the_run_identity(tmp_path):
    """A mask's content (masks/ file or a photo's alpha) and a caption's are the run's identity: editing
    one is a new run, not a resume; masked_loss off leaves the masks out, auto and on train the same."""
    from conftest import tiny_spec

    from dreambooth_ray.identity import run_name
    from dreambooth_ray.spec import parse_spec

    _photos(tmp_path / "s")

    def name(**train):
        spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(tmp_path / "s"), train={"resolution": 32, **train}))
        return run_name(spec, spec.subjects[0], "m", None)

    first = name()
    assert name(masked_loss="on") == first
    off = name(masked_loss="off")
    assert off != first
    Image.new("L", (32, 32), 200).save(tmp_path / "s" / "masks" / "b.png")  # another mask for b.jpg
    assert name() not in (first, off) and name(masked_loss="off") == off  # off: masks are not trained on
    second = name()
    alpha = Image.open(tmp_path / "s" / "a.png")
    alpha.putalpha(Image.fromarray(255 - np.asarray(alpha.getchannel("A"))))  # the cut-out's alpha inverted
    alpha.save(tmp_path / "s" / "a.png")
    assert name() != second
    third = name()
    (tmp_path / "s" / "c.txt").write_text("a photo of {identifier} {class_noun} on a table")
    assert name() != third and name(masked_loss="off") != off


def test_masks_beside_a_trained_text_encoder_are_warned_of(tmp_path, caplog):
    """The mask shields the denoiser, not a trained text encoder (benchmarks/results/toyworld_masks*.md):
    the preflight says so, once, naming the subject; with the encoder frozen it says nothing."""
    import logging

    from conftest import tiny_spec

    from dreambooth_ray import preflight
    from dreambooth_ray.spec import parse_spec

    _photos(tmp_path / "s")
    caplog.set_level(logging.WARNING, logger="dreambooth_ray")
    for trained in (True, False):
        caplog.clear()
        preflight.photo_check(parse_spec(tiny_spec(str(tmp_path / "store"), str(tmp_path / "s"), train={
            "resolution": 32, "train_text_encoder": trained})))
        warned = [r.getMessage() for r in caplog.records if "text encoder" in r.getMessage()]
        assert len(warned) == (1 if trained else 0) and (not trained or warned[0].startswith("subject(s) toy:")), warned


def test_masked_loss_on_needs_every_photo_masked(tmp_path):
    from conftest import tiny_spec

    from dreambooth_ray import preflight
    from dreambooth_ray.spec import parse_spec

    _photos(tmp_path / "s")
    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(tmp_path / "s"), train={"resolution": 32,
                                                                                    "masked_loss": "on"}))
    problems = preflight.photo_problems(spec)
    assert len(problems) == 1 and "masked_loss is on" in problems[0] and problems[0].endswith(": c.jpg")
    Image.new("L", (32, 32), 255).save(tmp_path / "s" / "masks" / "c.png")
    assert preflight.photo_problems(spec) == []
    with pytest.raises(Exception, match="masked_loss"):
        parse_spec(tiny_spec(str(tmp_path / "store"), str(tmp_path / "s"), train={"masked_loss": "yes"}))


def test_encoded_pools_carry_the_masks(tmp_path):
    """encode.py stores the masks on the latent grid beside the latent pools; a worker reads them back."""
    from conftest import tiny_spec

    from dreambooth_ray import encode
    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.storage import Storage

    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(tmp_path / "s")))
    masks = torch.rand(3, 2, 1, 16, 16)
    frozen = engine.FrozenInputs(instance=torch.randn(3, 2, 8, 16, 16), scaling_factor=0.18, masks=masks)
    encode.save(Storage(spec.storage), spec, "run", frozen)
    back = encode.load(Storage(spec.storage), spec, "run")
    assert torch.equal(back.masks, masks) and torch.equal(back.instance, frozen.instance)


def test_a_run_trains_on_the_masks_and_captions(ray_cluster, group, tiny_parts, tmp_path):
    """Through run_job (Ray, the encode task's stored pools, a worker): the final step's subject loss is
    the one engine.build computes in this process from the same photos, masks and caption, and not the
    unmasked one; job.json counts the masked and captioned photos."""
    import json

    from conftest import tiny_spec

    from dreambooth_ray import job
    from dreambooth_ray.spec import parse_spec

    _photos(tmp_path / "s")
    (tmp_path / "s" / "c.txt").write_text("a photo of {identifier} {class_noun} on a table")
    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(tmp_path / "s"), prior={"enabled": False},
                                train={"resolution": 32, "steps": 2, "checkpoint_every": 2, "num_workers": 1,
                                       "mixed_precision": "fp32", "learning_rate": 1e-3, "max_failures": 0,
                                       "random_flip": True, "batch_size": 3, "seed": 1}))  # step 1 draws a, b, c
    [r] = job.run_job(spec)
    assert r.status == "done", r
    record = json.loads((tmp_path / "store" / "outputs" / "t" / "toy" / "job.json").read_text())
    assert record["masks"] == 2 and record["captions"] == 1  # a.png's alpha, masks/b.png; c.txt

    photos, _ = read_images(str(tmp_path / "s"), 32)
    subject = spec.subjects[0]

    def last_subject_loss(**kw):
        eng = engine.build(copy.deepcopy(tiny_parts), [p.image for p in photos], [], subject.instance_text,
                           subject.class_text, spec.train, spec.prior.loss_weight, CPU, **kw)
        return [eng.step(s)[1].item() for s in range(spec.train.steps)][-1]

    caps = [subject.prompt(p.caption) if p.caption else None for p in photos]
    want = last_subject_loss(masks=[p.mask for p in photos], captions=caps)
    # Measured in this process: 0.988198; unmasked 0.997527; masked without the caption 0.988179 (1.8e-5
    # away: the caption's effect after one update is small; test_captions.py checks it row by row).
    assert record["metrics"]["instance_loss"] == pytest.approx(want, rel=1e-5)  # passed at 1e-5
    assert abs(last_subject_loss(captions=caps) - want) > 5e-3
    assert abs(last_subject_loss(masks=[p.mask for p in photos]) - want) > 1e-5
