"""The super-resolution stage: conditioned on the real low-res image, at the configured noise level."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_ray import job, models, sr
from dreambooth_ray.data import DreamBoothData, step_generator, to_tensor
from dreambooth_ray.engine import DreamBoothModel
from dreambooth_ray.spec import parse_spec

from conftest import assert_exported_is_the_trained_checkpoint, final_checkpoint, tiny_spec

# Measured 0 (the actor and this process, both on the CPU); 2 grey levels allow for a thread count that
# changes the order of float sums.
DIFF_MAX = 2


@pytest.fixture(scope="module")
def parts():
    return models.load_sr_components("tiny-sr")


def _subject(size=64):
    return [Image.effect_noise((size, size), 80).convert("RGB"), Image.new("RGB", (size, size), (200, 40, 40))]


def _model_inputs(parts, rows, noise_aug, seed=0, **layout):
    """Run one SR step and capture what the UNet was given."""
    seen = {}

    def hook(module, args, kwargs):
        seen["x"], seen["labels"] = args[0].detach().clone(), kwargs["class_labels"].detach().clone()

    h = parts["unet"].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        states = torch.zeros(rows.shape[0], 77, parts["unet"].config.cross_attention_dim)
        loss, _, _ = sr.sr_step(DreamBoothModel(parts["unet"]), parts["noise_scheduler"], parts["image_noising_scheduler"],
                                rows, rows.shape[0], step_generator(seed, 0), 1.0, noise_aug, torch.float32,
                                torch.device("cpu"), encoder_hidden_states=states, **layout)
    finally:
        h.remove()
    return seen, loss


def test_sr_unet_is_conditioned_on_the_real_low_res_image(parts):
    data = DreamBoothData(_subject(), [], random_flip=False, encode=sr.lowres_pairs(16))
    rows = data.instance[:, 0]
    hi, lo_up = rows.chunk(2, dim=1)
    # The conditioning image is the photo itself, downsampled to 16 px and upsampled back as IF does.
    lo = torch.nn.functional.interpolate(hi, (16, 16), mode="bicubic", antialias=True).clamp(-1, 1)
    assert torch.allclose(lo_up, sr.upsample(lo, 64), atol=1e-6)

    seen, loss = _model_inputs(parts, rows, noise_aug=1e-5)
    noisy_target, cond = seen["x"].chunk(2, dim=1)
    assert torch.allclose(cond, lo_up, atol=0.05)  # 1e-5 noise augmentation: barely changed
    # The diffusers IF stage II shortcut feeds the noisy target into these channels instead.
    assert (cond - noisy_target).abs().mean() > 0.3
    shortcut = torch.cat([noisy_target, noisy_target], dim=1)
    assert not torch.allclose(seen["x"], shortcut)
    # ...and the loss depends on the low-res image: another one gives another loss.
    other = rows.clone()
    other[:, 3:] = -other[:, 3:]
    _, loss_other = _model_inputs(parts, other, noise_aug=1e-5)
    assert not torch.isclose(loss, loss_other)


@pytest.mark.parametrize("level,label", [(1e-5, 0), (1e-3, 1), (0.3, 300)])
def test_noise_augmentation_level_reaches_the_model(parts, level, label):
    """Level s is the noising schedule's integer timestep nearest s * (T - 1), the only levels IF's pipeline
    samples with: it is the class label, and the low-res image is noised to that timestep's alpha-bar."""
    data = DreamBoothData(_subject(), [], random_flip=False, encode=sr.lowres_pairs(16))
    rows = data.instance[:, 0]
    seen, _ = _model_inputs(parts, rows, noise_aug=level)
    assert seen["labels"].tolist() == [label, label]  # the class label is the level
    abar = float(parts["image_noising_scheduler"].alphas_cumprod.double()[label])
    residual = seen["x"][:, 3:] - abar**0.5 * rows[:, 3:]
    # The noise actually added has the schedule's std at that level (within sampling error).
    assert abs(residual.std().item() / (1 - abar) ** 0.5 - 1) < 0.05


@pytest.fixture(scope="module")
def x4_parts():
    return models.load_sr_components("tiny-x4")


def _x4_inputs(parts, rows, noise_aug, seed=0):
    return _model_inputs(parts, rows, noise_aug, seed, kind="x4", scaling_factor=parts["vae"].config.scaling_factor)


def test_x4_upscaler_layout_is_conditioned_on_the_real_low_res_image(x4_parts):
    assert sr.layout(x4_parts["unet"]) == "x4"
    photos = _subject()
    data = DreamBoothData(photos, [], random_flip=False, encode=sr.latent_pairs(x4_parts["vae"], 16, torch.device("cpu")))
    rows = data.instance[:, 0]
    assert rows.shape == (2, 4 + 4 + 3, 16, 16)  # latent mean, latent std, the real 16 px image
    assert torch.allclose(rows[:, 8:], sr.downsample(to_tensor(photos), 16), atol=1e-5)

    seen, loss = _x4_inputs(x4_parts, rows, noise_aug=1e-5)
    assert seen["x"].shape == (2, 7, 16, 16)
    assert seen["labels"].tolist() == [0, 0]  # 1e-5 of an integer schedule: level 0
    assert (seen["x"][:, 4:] - rows[:, 8:]).abs().mean() < 0.02  # level 0: the low-res image, barely noised
    seen, _ = _x4_inputs(x4_parts, rows, noise_aug=0.3)
    assert seen["labels"].tolist() == [300, 300]  # the level reaches the model as its class label
    other = rows.clone()
    other[:, 8:] = -other[:, 8:]
    assert not torch.isclose(loss, _x4_inputs(x4_parts, other, noise_aug=1e-5)[1])
    with pytest.raises(ValueError, match="sr.input_resolution must be 16"):
        DreamBoothData(_subject(), [], random_flip=False, encode=sr.latent_pairs(x4_parts["vae"], 32, torch.device("cpu")))


def test_x4_upscaler_pipeline_upscales_to_the_output_resolution():
    from dreambooth_ray.spec import SRConfig

    pipe = models.load_pipeline("tiny-x4")
    cfg = SRConfig(enabled=True, model="tiny-x4", input_resolution=16, output_resolution=64, inference_steps=2)
    assert sr.noise_level(cfg, pipe) == 0
    assert sr.upscale(pipe, "a sks toy", Image.new("RGB", (32, 32), (200, 40, 40)), cfg, seed=0).size == (64, 64)


def _sampling_labels(model: str, noise_aug: float) -> set[float]:
    """The class labels the pipeline's UNet is given when sr.upscale samples at the spec's noise_aug."""
    from dreambooth_ray.spec import SRConfig

    pipe = models.load_pipeline(model)
    seen = []
    h = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    cfg = SRConfig(enabled=True, model=model, input_resolution=16, output_resolution=64, inference_steps=1,
                   noise_aug=noise_aug)
    try:
        sr.upscale(pipe, "a sks toy", Image.new("RGB", (16, 16), (200, 40, 40)), cfg, seed=0)
    finally:
        h.remove()
    assert len(seen) == 1  # one UNet call per inference step
    return {float(v) for labels in seen for v in labels}


@pytest.mark.parametrize("model,noise_aug", [
    ("tiny-x4", 1e-5), ("tiny-x4", 0.3), ("tiny-sr", 1e-5), ("tiny-sr", 0.3)])
def test_sr_noise_labels_agree_between_training_and_sampling(parts, x4_parts, model, noise_aug):
    if model == "tiny-x4":
        rows = DreamBoothData(_subject(), [], random_flip=False,
                              encode=sr.latent_pairs(x4_parts["vae"], 16, torch.device("cpu"))).instance[:, 0]
        seen, _ = _x4_inputs(x4_parts, rows, noise_aug)
    else:
        rows = DreamBoothData(_subject(), [], random_flip=False, encode=sr.lowres_pairs(16)).instance[:, 0]
        seen, _ = _model_inputs(parts, rows, noise_aug)
    training = {float(v) for v in seen["labels"]}
    assert _sampling_labels(model, noise_aug) == training, (model, noise_aug)


X4_TRAIN = """
import copy, json, numpy as np, torch, torch.nn.functional as F
from PIL import Image, ImageOps
from dreambooth_ray import bench, models, sr
from dreambooth_ray.data import step_generator
from dreambooth_ray.spec import SRConfig, TrainConfig

bench._init_single_process_group(torch.device("cpu"))
parts = models.load_sr_components("tiny-x4")
unet, vae, te, tok = parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]
sched, low_res = parts["noise_scheduler"], parts["image_noising_scheduler"]
before = copy.deepcopy(unet)
initial = torch.cat([p.detach().flatten() for p in unet.parameters()])
s = SRConfig(enabled=True, model="tiny-x4", input_resolution=16, output_resolution=64, steps=2, learning_rate=1e-3,
             mixed_precision="fp32", noise_aug=0.1)
cfg = s.train_config(TrainConfig(resolution=16, zero_stage=2, random_flip=True))  # the flip draw below
rng = np.random.default_rng(0)
photos = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
eng = sr.build(parts, photos, [], "a sks toy", "a toy", cfg, s, 16, torch.device("cpu"))

@torch.no_grad()
def inputs(step):
    # The x4 step by hand, drawing from the step's generator in the engine's order: row pick and flip,
    # VAE latent sample, target noise, timestep, low-res noise.
    g = step_generator(cfg.seed, step, 0, 0)
    idx = torch.randint(3, (1,), generator=g).item()
    flip = torch.rand(1, generator=g).item() < 0.5
    im = ImageOps.mirror(photos[idx]) if flip else photos[idx]
    px = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    dist = vae.float().encode(px).latent_dist
    lo = F.interpolate(px, (16, 16), mode="bicubic", antialias=True).clamp(-1, 1)
    x0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    level = round(0.1 * 999)  # the integer noise level nearest to noise_aug 0.1
    abar, abar_lo = sched.alphas_cumprod[t].view(1, 1, 1, 1), low_res.alphas_cumprod[level]
    lo = abar_lo.sqrt() * lo + (1 - abar_lo).sqrt() * torch.randn(lo.shape, generator=g)
    x = torch.cat([abar.sqrt() * x0 + (1 - abar).sqrt() * noise, lo], dim=1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0  # the x4 upscaler predicts v
    ids = tok(["a sks toy"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    return x, t, torch.tensor([level]), te(ids)[0], v

def loss_of(model, step):
    x, t, labels, states, v = inputs(step)
    return F.mse_loss(model(x, t, states, class_labels=labels).sample, v)

ref0 = loss_of(before, 0)
ref0.backward()
grad = torch.cat([p.grad.flatten() for p in before.parameters()])
torch.nn.utils.clip_grad_norm_(before.parameters(), 1.0)
torch.optim.AdamW(before.parameters(), lr=1e-3, weight_decay=1e-2).step()
step0 = eng.step(0).tolist()[0]
trained, ref = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (unet, before))
# Adam divides by sqrt(v) + 1e-8: rounding in a gradient near (not at) zero becomes up to a whole step. Compare
# the entries with no gradient (the unused class-label rows: weight decay only) and those above 1e-5.
keep = (grad == 0) | (grad.abs() > 1e-5)
with torch.no_grad():
    ref1 = loss_of(unet, 1).item()  # step 1's inputs through the weights DeepSpeed trained at step 0
step1 = eng.step(1).tolist()[0]
print(json.dumps({"step0": step0, "ref0": ref0.item(), "step1": step1, "ref1": ref1, "kept": keep.float().mean().item(),
                  "weights_diff": (trained - ref)[keep].abs().max().item(),
                  "moved": (ref - initial).abs().max().item(),
                  "clipped": grad.norm().item() > 1}))
"""


def test_x4_upscaler_trains_through_deepspeed():
    """The x4 layout's training step through sr.build and DeepSpeed, against the step computed by hand
    from the same generator: the loss, the weights after one update (plain torch AdamW on the hand-made
    loss), and the next step's loss on the weights DeepSpeed trained."""
    # A fresh process: the DeepSpeed engine needs a torch.distributed group, which must not leak here.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", X4_TRAIN], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # Measured: step 0 equal to the last bit, step 1 to 1e-7 relative; the weights to 1.5e-8 over 97% of the
    # entries, the update being up to 1e-3 (lr) and the gradient clipped (norm 3.6).
    assert r["step0"] == pytest.approx(r["ref0"], rel=1e-5)
    assert r["step1"] == pytest.approx(r["ref1"], rel=1e-5)
    assert r["clipped"] and r["moved"] > 5e-4 and r["kept"] > 0.9 and r["weights_diff"] < 1e-7


def test_sr_spec_errors():
    base = {"name": "x", "subject": {"name": "a", "images": ".", "class": "dog"}, "train": {"resolution": 64}}
    with pytest.raises(ValueError, match="sr.output_resolution \\(64\\) must be above"):
        parse_spec({**base, "sr": {"enabled": True, "output_resolution": 64}})
    with pytest.raises(ValueError, match="sr.noise_aug"):
        parse_spec({**base, "sr": {"enabled": True, "noise_aug": 2}})


def test_cascade_job_base_then_sr_to_s3(ray_cluster, s3_endpoint, bucket, toy_images):
    """The paper's cascade on tiny models: IF stage I (pixel space, T5 text) at 32 px, then IF stage II."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    root = f"s3://{bucket}/jobs"
    # Prior weights other than 1 (0.25 base, 0.5 SR), so the reported losses show each stage uses its own.
    spec = parse_spec(tiny_spec(root, str(toy_images), name="cascade", model="tiny-if",
                                prior={"num_class_images": 2, "num_actors": 1, "loss_weight": 0.25},
                                train={"steps": 2, "checkpoint_every": 2},
                                sr={"enabled": True, "output_resolution": 64, "steps": 3, "checkpoint_every": 3,
                                    "learning_rate": 1e-3, "mixed_precision": "fp32", "prior_preservation": True,
                                    "prior_loss_weight": 0.5, "inference_steps": 2},
                                s3={"endpoint_url": s3_endpoint}))
    [r] = job.run_job(spec)
    assert r.status == "done", r.error
    assert r.stages["sr"] == "ran"
    from dreambooth_ray.storage import Storage

    storage = Storage(root, spec.s3)
    where = ("outputs", "cascade", "toy")
    record = storage.read_json(*where, "job.json")
    assert record["sr_model"] == f"{root}/outputs/cascade/toy/sr"
    # Each stage trained on its class images (pixel space for IF stage I; down/upsampled pairs for stage II),
    # weighted by its own prior weight: L = L_subject + w L_prior, to float32 rounding.
    base_m, sr_m = record["metrics"], record["sr_metrics"]
    assert base_m["step"] == 2 and sr_m["step"] == 3
    for m, w in ((base_m, 0.25), (sr_m, 0.5)):
        assert m["prior_loss"] > 0 and m["loss"] == pytest.approx(m["instance_loss"] + w * m["prior_loss"], rel=1e-6)
    # No worker of either stage built a T5: encode tasks computed the prompts' states (encode.py), deleted once
    # trained.
    assert base_m["parts_not_loaded"] == sr_m["parts_not_loaded"] == ["text_encoder"]
    from dreambooth_ray import encode

    assert not storage.exists(*encode.where(spec, storage.read_json(*where, "sr.json")["run"]))

    # Both stages were exported by their training workers, in train.export_dtype, and hold their final
    # checkpoints' trained UNets.
    assert (record["exported_by"], record["sr_exported_by"], record["sr_dtype"]) == ("training workers",) * 2 + ("fp16",)
    base_pipe = IFPipeline.from_pretrained(models.resolve(record["model"], spec.s3))
    final, _ = final_checkpoint(storage, where, "train.json")
    assert record["dtype"] == "fp16" and spec.train.export_dtype is None  # IF's default
    assert_exported_is_the_trained_checkpoint(base_pipe.unet.state_dict(), final,
                                              models.load_pipeline("tiny-if").unet.state_dict(), lr=1e-3,
                                              dtype=torch.float16)
    # In fp32 (exactly the fp16 values), so that it runs on a CPU below.
    pipe = IFSuperResolutionPipeline.from_pretrained(models.resolve(record["sr_model"], spec.s3),
                                                     torch_dtype=torch.float32)
    final, _ = final_checkpoint(storage, where, "sr.json")
    sr_base = models.load_sr_components("tiny-sr")["unet"].state_dict()
    assert_exported_is_the_trained_checkpoint(pipe.unet.state_dict(), final, sr_base, lr=1e-3, dtype=torch.float16)
    # The SR stage's class images come through the cascade, as in the paper: the base stage's own class
    # images (32 px) upsampled by the pretrained SR model, not the base model asked for 64 px.
    from dreambooth_ray import priors

    subject = spec.subjects[0]
    sr_cache = priors.PriorCache.for_sr(spec, subject, storage, models.identity(spec.model, spec.s3),
                                        models.identity(spec.sr.model, spec.s3))
    base_cache = priors.PriorCache.for_subject(spec, subject, storage, models.identity(spec.model, spec.s3))
    assert storage.read_json("priors", sr_cache.key, "meta.json")["upsampled_from"] == base_cache.key
    pretrained = models.prepare_sampler(models.load_pipeline(spec.sr.model, spec.s3), "cpu")
    for i, (made, low) in enumerate(zip(sr_cache.load(2), base_cache.load(2))):
        assert made.size == (64, 64) and low.size == (32, 32)
        want = sr.upscale(pretrained, subject.class_text, low, spec.sr, spec.prior.seed * 1_000_003 + i)
        diff = np.abs(np.asarray(made, dtype=int) - np.asarray(want, dtype=int))
        assert diff.max() <= DIFF_MAX, diff.max()

    grid = Image.open(storage.fs.open(storage.path("outputs", "cascade", "toy", "samples.png")))
    assert grid.size[0] == 4 * 192  # 2 prompts x (pre-SR image, SR image)
    out = sr.upscale(pipe, "a sks toy", Image.new("RGB", (32, 32), "red"), spec.sr, 0)
    assert out.size == (64, 64)

    # The subject's timeline has the SR stage, and counts the bytes the SR workers wrote (their checkpoint and
    # export) besides the base stage's.
    assert record["timeline"]["sr"] > 0
    written = sum(storage.fs.du(p) for p in (storage.read_json(*where, "train.json")["checkpoint"],
                                             storage.read_json(*where, "sr.json")["checkpoint"],
                                             storage.path(*where, "model"), storage.path(*where, "sr")))
    assert record["timeline"]["bytes_written"] > written

    # Without the workers' SR export (one that failed, say), a re-run finds both stages trained and exports the
    # SR stage from its final checkpoint, in fp32.
    storage.fs.rm([storage.path(*where, "job.json"), storage.path(*where, "sr_export.json")])
    [again] = job.run_job(spec)
    assert again.status == "done" and again.stages["train"] == again.stages["sr"] == "skipped"
    record = storage.read_json(*where, "job.json")
    assert (record["sr_exported_by"], record["sr_dtype"], record["exported_by"]) == ("final checkpoint", "fp32",
                                                                                   "training workers")
    pipe = IFSuperResolutionPipeline.from_pretrained(models.resolve(record["sr_model"], spec.s3))
    assert_exported_is_the_trained_checkpoint(pipe.unet.state_dict(), final, sr_base, lr=1e-3)
