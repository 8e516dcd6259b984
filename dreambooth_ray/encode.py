"""Encode: what a subject's run computes from its frozen parts, once, off the training workers.

A DreamBooth run encodes two prompts (instance, class) with frozen text encoders and, with cached
latents, a few photos and the class images with a frozen VAE. A Ray task does it after the class
images are ready, on one device, and stores the result beside the run (safetensors: nothing
unpickled); the training workers load only what they train (the denoiser; text encoders only when
trained), so a T5-XXL (19 GB in fp32) or the VAE is never built on them. Both stages: the base run
(engine.frozen_inputs) and the SR run (sr.frozen_inputs: IF stage II's T5, the x4 upscaler's CLIP and
its VAE's latent pairs), each under its own run's name.
"""

from __future__ import annotations

import json

import ray
import torch

from . import engine, models, sr
from .images import load_subject_images
from .priors import PriorCache
from .spec import JobSpec, Subject
from .storage import Storage

FILE = "frozen.safetensors"


def where(spec: JobSpec, run: str) -> tuple[str, ...]:
    # Keyed by the run's name, which hashes everything they depend on (model, subject, prompts,
    # class images, resolution, batch, flips, precision).
    return ("encoded", spec.name, run, FILE)


def needed(spec: JobSpec, stage: str = "base") -> frozenset:
    """The parts a run's workers can skip: what the encode task computes for them."""
    if stage == "sr":
        return frozenset(sr.frozen_parts(models.family(spec.sr.model, spec.s3, role="sr")))
    return frozenset(engine.frozen_parts(models.family(spec.model, spec.s3), spec.train))


def save(storage: Storage, spec: JobSpec, run: str, frozen: engine.FrozenInputs) -> None:
    from safetensors.torch import save as to_bytes

    tensors = {f"conditioning.{k}": v.contiguous().cpu() for k, v in (frozen.conditioning or {}).items()
               if v is not None}
    tensors.update({k: v.contiguous() for k, v in (("instance", frozen.instance), ("classes", frozen.classes),
                                                   ("masks", frozen.masks)) if v is not None})
    meta = {"scaling_factor": frozen.scaling_factor, "shift_factor": frozen.shift_factor,
            "conditioning": frozen.conditioning is not None}
    storage.write_bytes(to_bytes(tensors, metadata={"frozen": json.dumps(meta)}), *where(spec, run))


def load(storage: Storage, spec: JobSpec, run: str) -> engine.FrozenInputs | None:
    from safetensors.torch import load as from_bytes

    blob = storage.read_bytes(*where(spec, run))
    if blob is None:
        return None
    tensors, meta = from_bytes(blob), _metadata(blob)
    cond = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("conditioning.")}
    return engine.FrozenInputs(conditioning=cond if meta["conditioning"] else None,
                               instance=tensors.get("instance"), classes=tensors.get("classes"),
                               masks=tensors.get("masks"),
                               scaling_factor=meta["scaling_factor"], shift_factor=meta["shift_factor"])


def discard(storage: Storage, spec: JobSpec, run: str) -> None:
    """Once the run is trained (class latents are ~100 MB a subject at 1024 px)."""
    path = storage.path(*where(spec, run))
    if storage.fs.exists(path):
        storage.fs.rm(path)


def _metadata(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")  # safetensors: an 8-byte header length, then the JSON header
    return json.loads(json.loads(blob[8 : 8 + n])["__metadata__"]["frozen"])


@ray.remote(num_cpus=0)
def encode_task(spec: JobSpec, runs: list[tuple[Subject, str, str | None]], stage: str = "base") -> dict:
    """encode_runs in a Ray task: one run's frozen inputs, or a pack's, the frozen parts loaded once."""
    return encode_runs(spec, runs, stage)


def encode_runs(spec: JobSpec, runs: list[tuple[Subject, str, str | None]], stage: str = "base") -> dict:
    """Each (subject, run, prior key)'s frozen inputs for `stage`, computed and stored; the parts loaded once."""
    import time

    from .storage import io_counts

    t0, cfg, io_start = time.perf_counter(), spec.stage_train(stage), io_counts()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    storage = Storage(spec.storage, spec.s3)
    if stage == "sr":  # the frozen parts alone: not the UNet
        parts = models.load_sr_components(spec.sr.model, spec.s3, skip={"unet"})
        in_res = spec.sr.input_resolution or spec.train.resolution

        def compute(subject, photos, classes):
            return sr.frozen_inputs(parts, [p.image for p in photos], classes, subject.instance_text,
                                    subject.class_text, cfg, in_res, device)
    else:
        fam = models.family(spec.model, spec.s3)
        # Only the parts it encodes with (tokenizers aside): not the denoiser, not a text encoder that trains
        parts = models.load_components(spec.model, spec.s3,
                                       skip={fam.denoiser, *(set(fam.text_encoders) - needed(spec))})

        def compute(subject, photos, classes):
            return engine.frozen_inputs(parts, [p.image for p in photos], classes, subject.instance_text,
                                        subject.class_text, cfg, device, [p.mask for p in photos],
                                        [subject.prompt(p.caption) if p.caption else None for p in photos])
    for subject, run, prior_key in runs:
        photos = load_subject_images(subject.images, cfg.resolution, spec.s3, spec.skip_bad_images, quiet=True)
        classes = (PriorCache(storage, prior_key, subject.class_text, cfg.resolution, spec.prior)
                   .load(spec.prior.num_class_images) if prior_key else [])
        save(storage, spec, run, compute(subject, photos, classes))
    written, read = (now - then for now, then in zip(io_counts(), io_start))
    return {"seconds": round(time.perf_counter() - t0, 3), "parts": sorted(needed(spec, stage)),
            "bytes_written": written, "bytes_read": read}
