"""The product path on a GPU: Ray Train workers on CUDA with NCCL, DeepSpeed ZeRO, quickstart-size jobs.

Marked `gpu`: skipped where torch sees no CUDA device (tests/gpu/conftest.py), so `make test` on a
CPU machine never starts them. `make gpu-check` runs them and records the output in
benchmarks/results/gpu-check.txt.

Written for one GPU: one Ray Train worker per run, runs one after another. Two workers cannot share
the device through fractional GPUs (resources_per_worker={"GPU": 0.5}): NCCL refuses two ranks on one
device. One prior actor too: each takes a whole GPU, and a second one could never start while the
first holds it.

Each test checks that the run used the GPU from what it saved: the checkpoint records the device its
training state lived on, and a CUDA run's names "cuda".
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest

from conftest import assert_trained_and_identical, tiny_spec

pytestmark = pytest.mark.gpu

STEPS = 6  # the quickstart's


def gpu_spec(tmp_path, images, **sections):
    from dreambooth_ray.spec import parse_spec

    train = {"steps": STEPS, "checkpoint_every": 3, "num_workers": 1, "use_gpu": True, "mixed_precision": "bf16",
             **sections.pop("train", {})}
    prior = {"num_actors": 1, **sections.pop("prior", {})}
    return parse_spec(tiny_spec(str(tmp_path / "store"), str(images), train=train, prior=prior, **sections))


@contextlib.contextmanager
def checkpoint_dir(path: str):
    """A finished stage's checkpoint (the path its train.json / sr.json records) as a local folder."""
    import ray.train

    from dreambooth_ray.checkpoint import local_copy

    with local_copy(ray.train.Checkpoint(path)) as d:
        yield d


def saved_device(ckpt_dir) -> str:
    """Where the training state lived, as the checkpoint records it (an async checkpoint is written
    from a host copy, so its tensors pickle as "cpu" whatever device they came from)."""
    from dreambooth_ray.checkpoint import weights_only

    files = sorted(Path(ckpt_dir).rglob("*model_states.pt"))
    assert files, f"no DeepSpeed model-state file in {ckpt_dir}"
    import torch

    with weights_only():
        return torch.load(files[0], map_location="cpu")["device"]


def assert_ran_on_gpu(ckpt_dir) -> None:
    device = saved_device(ckpt_dir)
    assert device.startswith("cuda"), f"the checkpoint's training state lived on {device}, not on a CUDA device"


def assert_finite_losses(metrics: dict) -> None:
    for k in ("loss", "instance_loss", "prior_loss"):
        assert math.isfinite(metrics[k]), f"{k} is {metrics[k]} (metrics: {metrics})"


def assert_trained(weights: dict, base_unet, cfg) -> None:
    """Most consolidated (fp32 master) UNet tensors moved off the base model's. The master copy
    of a half-precision engine (bf16-weights, fp16) starts from the base weights rounded to that
    dtype, so untrained ones compare equal to those, not to the fp32 originals."""
    import torch

    from dreambooth_ray.engine import weight_dtype

    dtype = weight_dtype(cfg)
    base = base_unet.state_dict()
    changed = [k for k in weights if not torch.equal(weights[k], base[k.removeprefix("unet.")].to(dtype).float())]
    assert len(changed) > len(weights) // 2, f"only {len(changed)} of {len(weights)} tensors changed: did it train?"


@pytest.mark.parametrize("precision,zero", [("bf16", 2), ("bf16-weights", 3), ("fp16", 2), ("fp16", 3)],
                         ids=lambda v: f"zero{v}" if isinstance(v, int) else v)
def test_job_trains_exports_and_samples_on_gpu(ray_cluster, tmp_path, toy_images, precision, zero):
    """The whole job (prior images, training, export, samples) through job.run_job."""
    from dreambooth_ray import job, models
    from dreambooth_ray.checkpoint import consolidated_state_dict, read_state
    from dreambooth_ray.storage import Storage

    spec = gpu_spec(tmp_path, toy_images, train={"mixed_precision": precision, "zero_stage": zero})
    [r] = job.run_job(spec)
    assert r.status == "done", r.error
    storage = Storage(spec.storage)
    record = storage.read_json("outputs", "t", "toy", "job.json")
    metrics = record["metrics"]
    assert metrics["step"] == STEPS and r.steps == STEPS
    assert_finite_losses(metrics)
    assert metrics["prior_loss"] > 0  # the class images took part
    assert record["spec"]["train"]["mixed_precision"] == precision and record["spec"]["train"]["zero_stage"] == zero

    trained = storage.read_json("outputs", "t", "toy", "train.json")
    with checkpoint_dir(trained["checkpoint"]) as d:
        assert read_state(d) == {"step": STEPS, "started_at": 0, "world_size": 1}
        assert_ran_on_gpu(d)
        assert_trained(consolidated_state_dict(d), models.load_pipeline("tiny").unet, spec.train)
    assert Path(record["model"], "model_index.json").exists()
    assert Path(record["samples"]).stat().st_size > 0


def test_lora_job_on_gpu(ray_cluster, tmp_path, toy_images):
    import numpy as np
    import torch

    from dreambooth_ray import job, models
    from dreambooth_ray.checkpoint import consolidated_state_dict
    from dreambooth_ray.storage import Storage

    spec = gpu_spec(tmp_path, toy_images, prior={"enabled": False},
                    train={"method": "lora", "lora": {"rank": 4}, "learning_rate": 1e-2, "zero_stage": 2})
    [r] = job.run_job(spec)
    assert r.status == "done", r.error
    storage = Storage(spec.storage)
    record = storage.read_json("outputs", "t", "toy", "job.json")
    assert_finite_losses(record["metrics"])
    assert Path(record["lora"], "pytorch_lora_weights.safetensors").exists()

    trained = storage.read_json("outputs", "t", "toy", "train.json")
    with checkpoint_dir(trained["checkpoint"]) as d:
        assert_ran_on_gpu(d)
        weights = consolidated_state_dict(d)
    assert weights and all("lora" in k for k in weights), "a LoRA checkpoint holds the adapters only"
    # peft's "gaussian" init starts every lora_B at zero: trained ones are not.
    b = [k for k in weights if "lora_B" in k]
    assert b and all(weights[k].abs().max() > 0 for k in b)

    def render(p):
        g = torch.Generator().manual_seed(0)
        return np.asarray(p("a sks toy", num_inference_steps=3, height=32, width=32, generator=g).images[0])

    base = models.load_pipeline("tiny")
    before = render(base)
    base.load_lora_weights(record["lora"])
    assert not np.array_equal(before, render(base)), "the exported adapter should change the output"


def test_sr_stage_on_gpu(ray_cluster, tmp_path, toy_images):
    """The cascade of test_sr.py on the GPU: IF stage I (pixel space, T5 text), then the SR stage."""
    from dreambooth_ray import job, models
    from dreambooth_ray.checkpoint import consolidated_state_dict
    from dreambooth_ray.storage import Storage

    spec = gpu_spec(tmp_path, toy_images, name="cascade", model="tiny-if", prior={"num_class_images": 2},
                    train={"steps": 2, "checkpoint_every": 2},
                    sr={"enabled": True, "output_resolution": 64, "steps": 3, "checkpoint_every": 3,
                        "learning_rate": 1e-3, "prior_preservation": True, "inference_steps": 2})
    [r] = job.run_job(spec)
    assert r.status == "done", r.error
    assert r.stages["train"] == "ran" and r.stages["sr"] == "ran"
    storage = Storage(spec.storage)
    out = ("outputs", "cascade", "toy")
    record = storage.read_json(*out, "job.json")
    assert record["sr_metrics"]["step"] == 3 and record["sr_metrics"]["prior_loss"] > 0
    assert_finite_losses(record["metrics"])
    assert_finite_losses(record["sr_metrics"])
    assert Path(record["sr_model"], "model_index.json").exists()
    # Both lanes encoded first on their GPU (train.encode_first): no worker built a T5
    assert record["metrics"]["parts_not_loaded"] == record["sr_metrics"]["parts_not_loaded"] == ["text_encoder"]

    with checkpoint_dir(storage.read_json(*out, "train.json")["checkpoint"]) as d:
        assert_ran_on_gpu(d)
        assert_trained(consolidated_state_dict(d), models.load_pipeline("tiny-if").unet, spec.train)
    with checkpoint_dir(storage.read_json(*out, "sr.json")["checkpoint"]) as d:
        assert_ran_on_gpu(d)
        assert_trained(consolidated_state_dict(d), models.load_sr_components("tiny-sr")["unet"],
                       spec.sr.train_config(spec.train))


def test_killed_worker_resumes_on_gpu_with_identical_weights(ray_cluster, tmp_path, toy_images):
    """The worker is SIGKILLed after the step-2 checkpoint (as in test_checkpoints.py's ZeRO-2 test); Ray
    Train restarts it on the GPU from that checkpoint, and it ends where an uninterrupted run ends.
    With `train.deterministic`: without it two uninterrupted runs on an H100 differed by 2.0e-3
    (benchmarks/results/gpu-check.txt), so no resume could be bit-identical."""
    from dreambooth_ray import train
    from dreambooth_ray.checkpoint import consolidated_state_dict, read_state
    from dreambooth_ray.storage import Storage

    spec = gpu_spec(tmp_path, toy_images, prior={"enabled": False},
                    train={"steps": 4, "checkpoint_every": 2, "zero_stage": 2, "max_failures": 1,
                           "deterministic": True})
    storage, subject = Storage(spec.storage), spec.subjects[0]

    def final(run: str, fault=None):
        res = train.fit(spec, subject, storage, run, None, use_gpu=True, fault=fault)
        with checkpoint_dir(res.checkpoint.path) as d:
            assert_ran_on_gpu(d)
            return consolidated_state_dict(d), read_state(d)

    # One GPU: the two runs go one after the other (test_checkpoints.py trains them at once on CPUs).
    straight, state_a = final("straight")
    resumed, state_b = final("interrupted", ("kill", 2))
    assert state_a == {"step": 4, "started_at": 0, "world_size": 1}
    assert state_b == {"step": 4, "started_at": 2, "world_size": 1}  # resumed, not restarted
    try:
        assert_trained_and_identical(straight, resumed)
    except AssertionError as e:
        # Tell a resume bug from GPU kernels that are not bit-reproducible run to run.
        again, _ = final("straight-again")
        noise = max((straight[k] - again[k]).abs().max().item() for k in straight)
        if noise:
            raise AssertionError(
                f"{e}; two uninterrupted GPU runs differ too, by {noise}: train.deterministic did not make "
                "the worker's kernels deterministic (train.deterministic_kernels)") from e
        raise
