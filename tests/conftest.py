"""One local Ray cluster and one moto S3 server (127.0.0.1) for the whole session: real parts, no mocks."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    # Dummy credentials for the local server only; set before Ray starts so its workers inherit them.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret-0123456789",
                      AWS_DEFAULT_REGION="us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint):
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_endpoint, tmp_path_factory):
    import ray

    from dreambooth_ray.cli import init_ray

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    os.environ["DREAMBOOTH_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    init_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def quickstart(ray_cluster, tmp_path_factory):
    """jobs/quickstart.yaml (the pretrained `toy` model learning a toy-world subject), run once by the CLI in
    its own process on the session's Ray cluster, its console output (stdout and stderr) captured in a
    file as a user's would be; with an `eval:` section on the tiny metric models. The tests that read a
    finished job's outputs share it."""
    import subprocess
    from types import SimpleNamespace

    import ray
    import yaml

    tmp = tmp_path_factory.mktemp("quickstart")
    data = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    data["storage"] = str(tmp / "store")
    data["subject"]["images"] = str(ROOT / "jobs" / "toyworld-subjects" / "toy-purple-dots")
    data["prior"]["loss_weight"] = 0.5  # not the default 1: test_job checks job.json's loss is subject + 0.5 x prior
    data["eval"] = {"prompts": ["a {identifier} {class_noun} on the beach", "a red {identifier} {class_noun}"],
                    "images_per_prompt": 2, "class_images": 2, "inference_steps": 2, "num_actors": 2,
                    "batch_size": 2, "dino": "tiny-dino", "clip": "tiny-clip"}
    spec_file = tmp / "job.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    console = tmp / "console.txt"
    with open(console, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "dreambooth_ray.cli", "run", str(spec_file), "--address",
                             ray.get_runtime_context().gcs_address], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "COLUMNS": "120"}, timeout=900).returncode
    return SimpleNamespace(rc=rc, printed=console.read_text(), spec_file=spec_file, data=data, store=tmp / "store")


@pytest.fixture
def toy_images(tmp_path):
    from dreambooth_ray.tiny import make_subject_images

    folder = tmp_path / "toy"
    make_subject_images(folder, n=4)
    return folder


def tiny_spec(storage: str, images: str, **sections) -> dict:
    """A small job spec (tiny model, 32 px, few steps) with per-test overrides by section."""
    spec = {
        "name": "t",
        "model": "tiny",
        "storage": storage,
        "subjects": [{"name": "toy", "images": images, "class": "toy"}],
        "prior": {"num_class_images": 4, "inference_steps": 2, "batch_size": 2, "num_actors": 2},
        "train": {"resolution": 32, "steps": 4, "checkpoint_every": 2, "num_workers": 1, "zero_stage": 2,
                  "mixed_precision": "fp32", "learning_rate": 1e-3, "max_failures": 0},
        "samples": {"prompts": ["a {identifier} {class_noun}", "a {class_noun}"], "inference_steps": 2},
    }
    for k, v in sections.items():
        spec[k] = {**spec[k], **v} if isinstance(spec.get(k), dict) else v
    return spec


def assert_trained_and_identical(straight: dict, resumed: dict, what: str = "weights") -> None:
    """Consolidated UNet weights of an uninterrupted run and a resumed one: trained away from the tiny
    model's, and bit-identical to each other."""
    import torch

    from dreambooth_ray import models

    assert straight.keys() == resumed.keys()
    base = models.load_pipeline("tiny").unet.state_dict()
    assert any(not torch.allclose(straight[k], base[k.removeprefix("unet.")]) for k in straight)  # it did train
    diff = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    assert diff == 0.0, f"resumed {what} differ from the uninterrupted run by {diff}"


def final_checkpoint(storage, out: tuple[str, ...], record: str = "train.json") -> tuple[dict, dict]:
    """(consolidated weights, state.json) of the final checkpoint a finished stage recorded in
    `<out>/<record>` (train.json: the base stage; sr.json: the SR stage), wherever the storage is."""
    import ray.train

    return final_weights(ray.train.Checkpoint(storage.read_json(*out, record)["checkpoint"], storage.ray_storage()[1]))


def final_weights(ckpt) -> tuple[dict, dict]:
    """(consolidated weights, state.json) of a Ray Train checkpoint, local or in object storage."""
    from dreambooth_ray.checkpoint import consolidated_state_dict, local_copy, read_state

    with local_copy(ckpt) as d:
        return consolidated_state_dict(d), read_state(d)


def assert_exported_is_the_trained_checkpoint(exported: dict, final: dict, base: dict, lr: float, dtype=None,
                                              prefix: str = "unet.") -> None:
    """An exported model part's state dict is the final checkpoint's consolidated weights, bit for bit once
    those are rounded to the export's precision (`dtype`; None: fp32), and those are trained: every tensor
    moved from the base model's by at least half an AdamW step (lr / 2). Adam moves an entry with a gradient
    by about lr per step; weight decay alone moves a weight w by steps x lr x 0.01 x |w|, under lr / 10 for
    these few-step runs."""
    import torch

    dtype = dtype or torch.float32
    assert sorted(final) == sorted(prefix + k for k in exported)
    unequal = [k for k in exported if not torch.equal(exported[k].float(), final[prefix + k].to(dtype).float())]
    assert not unequal, f"exported weights differ from the final checkpoint's (in {dtype}) in {unequal[:5]}"
    moved = {k: (final[prefix + k] - v).abs().max().item() for k, v in base.items()}
    still = [k for k, d in moved.items() if d < lr / 2]
    assert not still, f"{len(still)} of {len(moved)} tensors moved less than lr / 2: {still[:5]}"


@pytest.fixture(scope="session")
def _gloo_world():
    """One 1-process gloo group for the session: DeepSpeed caches the first group it meets, so a group
    torn down and made anew in a later module is one it no longer knows."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.fixture
def group(_gloo_world):
    """This process as a Ray Train worker sees itself: in a 1-process group, with torch's launcher
    variables (DeepSpeed asserts LOCAL_RANK), restored after the test."""
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def render(pipe, prompt="a sks toy", res=32):
    """One 2-step image at a fixed seed, as an array."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(0)
    return np.asarray(pipe(prompt, num_inference_steps=2, height=res, width=res, generator=g).images[0])


def assert_exported_adapter_loads(out, pipe, parts: tuple[str, ...]) -> None:
    """A job's exported LoRA, loaded by the family's own pipeline (`load_lora_weights`), changes what it
    renders for the instance prompt and equals the LoRA weights of the job's final checkpoint, part by
    part (adapter names differ: peft's 'default' vs the loader's)."""
    import json
    import re

    import numpy as np
    import torch

    record = json.loads((out / "job.json").read_text())
    before = render(pipe, record["instance_prompt"])
    pipe.load_lora_weights(record["lora"])
    assert not np.array_equal(before, render(pipe, record["instance_prompt"])), "the adapter changes the output"

    from dreambooth_ray.checkpoint import consolidated_state_dict

    trained = consolidated_state_dict(json.loads((out / "train.json").read_text())["checkpoint"])
    adapter = lambda k: re.sub(r"\.lora_([AB])\.[^.]+\.", r".lora_\1.", k)  # noqa: E731
    # (a checkpoint also holds the denoiser's persistent buffers, e.g. SD3's position table: never trained)
    want = {adapter(k): v for k, v in trained.items() if "lora_" in k}
    got = {adapter(f"{part}.{k}"): v for part in parts for k, v in getattr(pipe, part).state_dict().items()
           if "lora_" in k}
    assert {k.split(".")[0] for k in want} == set(parts)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
