"""Export: the final (ZeRO-sharded) checkpoint becomes a diffusers pipeline folder plus a job record."""

from __future__ import annotations

import json
import platform
import tempfile
from importlib.metadata import version

import torch

from . import checkpoint, models
from .spec import JobSpec
from .storage import Storage


def versions() -> dict[str, str]:
    pkgs = ("dreambooth-ray", "torch", "ray", "deepspeed", "diffusers", "transformers")
    return {"python": platform.python_version(), **{p: version(p) for p in pkgs}}


def split_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{'unet.x': .., 'text_encoder.y': ..} -> {'unet': {'x': ..}, 'text_encoder': {'y': ..}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        part, _, rest = k.partition(".")
        out.setdefault(part, {})[rest] = v
    return out


def trained_pipeline(spec: JobSpec, ckpt_dir: str):
    """The base pipeline with the trained weights from a checkpoint folder swapped in."""
    pipe = models.load_pipeline(spec.model, spec.s3)
    for part, sd in split_state_dict(checkpoint.consolidated_state_dict(ckpt_dir)).items():
        getattr(pipe, part).load_state_dict(sd, strict=True)
    return pipe


def save(storage: Storage, pipe, out: tuple[str, ...]) -> str:
    """Write `<out>/model` in diffusers format; returns its URL."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        storage.put_dir(tmp, *out, "model")
    return storage.url(*out, "model")


def write_record(spec: JobSpec, storage: Storage, out: tuple[str, ...], record: dict) -> None:
    """`<out>/job.json`: spec, versions, steps and losses. Written last: its presence means complete."""
    record = {
        **record,
        "spec": json.loads(spec.model_dump_json(by_alias=True)),
        "versions": versions(),
        "model": storage.url(*out, "model"),
        "step": int(record["metrics"].get("step", spec.train.steps)),
    }
    storage.write_json(record, *out, "job.json")
