"""The super-resolution stage: conditioned on the real low-res image, at the configured noise level."""

import json

import pytest
import torch
from PIL import Image

from dreambooth_ray import job, models, sr
from dreambooth_ray.data import DreamBoothData, step_generator, to_tensor
from dreambooth_ray.engine import DreamBoothModel
from dreambooth_ray.spec import parse_spec

from conftest import tiny_spec


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


@pytest.mark.parametrize("level", [1e-5, 1e-3, 0.3])
def test_noise_augmentation_level_reaches_the_model(parts, level):
    data = DreamBoothData(_subject(), [], random_flip=False, encode=sr.lowres_pairs(16))
    rows = data.instance[:, 0]
    seen, _ = _model_inputs(parts, rows, noise_aug=level)
    T = parts["image_noising_scheduler"].config.num_train_timesteps
    assert torch.allclose(seen["labels"], torch.full((2,), level * (T - 1)))  # the class label is the level
    ac = parts["image_noising_scheduler"].alphas_cumprod.double()
    t = level * (T - 1)
    i = int(t)
    abar = float(ac[i] + (ac[i + 1] - ac[i]) * (t - i))
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


X4_TRAIN = """
import json, torch
from PIL import Image
from dreambooth_ray import bench, models, sr
from dreambooth_ray.spec import SRConfig, TrainConfig

bench._init_single_process_group(torch.device("cpu"))
parts = models.load_sr_components("tiny-x4")
before = {n: p.detach().clone() for n, p in parts["unet"].named_parameters()}
s = SRConfig(enabled=True, model="tiny-x4", input_resolution=16, output_resolution=64, steps=2, learning_rate=1e-3,
             mixed_precision="fp32")
cfg = s.train_config(TrainConfig(resolution=16, zero_stage=2))
photos = [Image.effect_noise((64, 64), 60).convert("RGB") for _ in range(3)]
eng = sr.build(parts, photos, [], "a sks toy", "a toy", cfg, s, 16, torch.device("cpu"))
losses = [eng.step(i).tolist()[0] for i in range(2)]
moved = sum(not torch.equal(before[n], p.detach()) for n, p in parts["unet"].named_parameters())
print(json.dumps({"losses": losses, "moved": moved, "params": len(before)}))
"""


def test_x4_upscaler_trains_through_deepspeed():
    # A fresh process: the DeepSpeed engine needs a torch.distributed group, which must not leak here.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", X4_TRAIN], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert all(0 < x < 10 for x in r["losses"]) and r["moved"] > r["params"] // 2


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
    spec = parse_spec(tiny_spec(root, str(toy_images), name="cascade", model="tiny-if",
                                prior={"num_class_images": 2, "num_actors": 1},
                                train={"steps": 2, "checkpoint_every": 2},
                                sr={"enabled": True, "output_resolution": 64, "steps": 3, "checkpoint_every": 3,
                                    "learning_rate": 1e-3, "mixed_precision": "fp32", "prior_preservation": True,
                                    "inference_steps": 2},
                                s3={"endpoint_url": s3_endpoint}))
    [r] = job.run_job(spec)
    assert r.status == "done", r.error
    assert r.stages["sr"] == "ran"
    from dreambooth_ray.storage import Storage

    storage = Storage(root, spec.s3)
    record = storage.read_json("outputs", "cascade", "toy", "job.json")
    assert record["sr_metrics"]["step"] == 3 and record["sr_metrics"]["prior_loss"] > 0
    assert record["sr_model"] == f"{root}/outputs/cascade/toy/sr"

    assert record["metrics"]["prior_loss"] > 0  # the base stage trained in pixel space, with its class images
    base_pipe = IFPipeline.from_pretrained(models.resolve(record["model"], spec.s3))
    first = models.load_pipeline("tiny-if").unet
    assert any(not torch.allclose(p, first.get_parameter(n)) for n, p in base_pipe.unet.named_parameters())

    # The exported SR stage is a diffusers IF stage II pipeline with the fine-tuned UNet.
    local = models.resolve(record["sr_model"], spec.s3)
    pipe = IFSuperResolutionPipeline.from_pretrained(local)
    base = models.load_sr_components("tiny-sr")["unet"]
    changed = [n for n, p in pipe.unet.named_parameters() if not torch.allclose(p, base.get_parameter(n))]
    assert len(changed) > 10
    grid = Image.open(storage.fs.open(storage.path("outputs", "cascade", "toy", "samples.png")))
    assert grid.size[0] == 4 * 192  # 2 prompts x (pre-SR image, SR image)
    out = sr.upscale(pipe, "a sks toy", Image.new("RGB", (32, 32), "red"), spec.sr, 0)
    assert out.size == (64, 64)

    # A re-run finds both stages done.
    [again] = job.run_job(spec)
    assert again.status == "skipped"
