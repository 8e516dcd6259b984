"""Base models: 'tiny', a hub id, a local diffusers folder or an s3:// prefix, all loaded one way."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

from . import tiny
from .errors import UserError
from .settings import S3Settings
from .storage import filesystem, is_remote


class ModelError(UserError, ValueError):
    """A model location that cannot be loaded; the message names it."""


def cache_root() -> Path:
    return Path(os.environ.get("DREAMBOOTH_RAY_CACHE", Path.home() / ".cache" / "dreambooth-ray"))


def _remote_listing(ref: str, s3: S3Settings | None, marker: str = "model_index.json") -> tuple[object, str, dict]:
    fs, root = filesystem(ref, s3)
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError:
        listing = {}
    if not any(p.endswith(marker) for p in listing):
        raise ModelError(f"model {ref!r}: no {marker} under it (expected a {_KIND[marker]} folder)")
    return fs, root, listing


_KIND = {"model_index.json": "diffusers pipeline", "config.json": "transformers model",
         "pytorch_lora_weights.safetensors": "diffusers LoRA"}


def identity(ref: str, s3: S3Settings | None = None, marker: str = "model_index.json") -> str:
    """A string that changes when the model's weights change: keys the prior-image cache."""
    if ref in tiny.BUILT_IN:
        return tiny.BUILT_IN[ref][0]
    if is_remote(ref):
        _, root, listing = _remote_listing(ref, s3, marker)
        sig = sorted((p[len(root):], d.get("size"), d.get("ETag") or d.get("etag")) for p, d in listing.items())
        return f"{ref}@{hashlib.sha256(json.dumps(sig, default=str).encode()).hexdigest()[:12]}"
    local = Path(ref)
    if local.is_dir():
        sig = sorted((str(p.relative_to(local)), p.stat().st_size, int(p.stat().st_mtime)) for p in local.rglob("*") if p.is_file())
        return f"{local.resolve()}@{hashlib.sha256(json.dumps(sig).encode()).hexdigest()[:12]}"
    return ref  # a hub id: its revision is the hub's business


def resolve(ref: str, s3: S3Settings | None = None, marker: str = "model_index.json") -> str:
    """Something `from_pretrained` accepts: a built-in tiny model's folder, a local folder (an s3://
    one downloaded once per machine), or a hub id. `marker`: the file that makes a folder a model."""
    if ref in tiny.BUILT_IN:
        return str(tiny.materialize(cache_root(), ref))
    if is_remote(ref):
        fs, root, listing = _remote_listing(ref, s3, marker)
        dest = cache_root() / "models" / hashlib.sha256(identity(ref, s3, marker).encode()).hexdigest()[:16]
        if not (dest / marker).exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".dl-"))
            fs.get(root + "/", str(tmp) + "/", recursive=True)
            try:
                os.rename(tmp, dest)
            except OSError:  # another process on this machine finished first
                shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)
    if Path(ref).exists():
        if not (Path(ref) / marker).exists():
            raise ModelError(f"model {ref!r}: a local folder without {marker} (not a {_KIND[marker]})")
        return ref
    return ref


def load_pipeline(ref: str, s3: S3Settings | None = None, torch_dtype=None):
    """The model as its family's pipeline class (class images, samples, eval and export all load
    through here); a pipeline no family knows loads as whatever DiffusionPipeline makes of it."""
    from diffusers import DiffusionPipeline

    from . import families

    path = resolve(ref, s3)
    try:
        cls = families.for_path(path).pipeline_class()
    except (families.UnsupportedModel, OSError, ValueError):
        cls = DiffusionPipeline
    try:
        pipe = cls.from_pretrained(path, torch_dtype=torch_dtype, safety_checker=None)
    except OSError as e:
        raise ModelError(f"model {ref!r}: cannot load ({e})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family(ref: str, s3: S3Settings | None = None, role: str | None = None):
    """The model's family (families/), from its model_index.json."""
    from . import families

    try:
        return families.for_path(resolve(ref, s3), role)
    except families.UnsupportedModel as e:
        raise ModelError(f"model {ref!r}: {e}") from None
    except OSError as e:
        raise ModelError(f"model {ref!r}: cannot load ({e})") from None


def load_components(ref: str, s3: S3Settings | None = None, partitioned=None, skip: frozenset = frozenset()):
    """The parts training needs, as the model's family loads them (families/), plus the family itself
    under "family": tokenizer(s), text encoder(s), a VAE (`vae: None` for a pixel-space family such
    as DeepFloyd IF stage I), the denoiser (UNet or transformer) and its training schedule.
    `partitioned`: a loader that shards the denoiser as it is built (ZeRO-3, engine.load_partitioned);
    `skip`: frozen parts not to load (None in the dict), whose outputs the caller has (encode.py)."""
    fam = family(ref, s3)
    try:
        return fam.load_parts(resolve(ref, s3), partitioned, frozenset(skip))
    except OSError as e:
        raise ModelError(f"model {ref!r}: cannot load ({e})") from None


def load_tokenizer(ref: str, s3: S3Settings | None = None):
    """The tokenizer `identifier: auto` searches, as the model's family names it: CLIP's BPE (Stable
    Diffusion, SDXL's first, the tiny models), else whatever the folder holds (IF's T5)."""
    from . import families

    path = resolve(ref, s3)
    try:
        fam = families.for_path(path)
    except (families.UnsupportedModel, OSError, ValueError):
        fam = families.SD
    return fam.tokenizer(path)


def generate(pipe, prompts: list[str], **kwargs):
    """pipe(prompts, ...).images, whatever the pipeline: IF's would otherwise clean captions with
    optional dependencies (bs4, ftfy)."""
    if "clean_caption" in inspect.signature(pipe.__call__).parameters:
        kwargs["clean_caption"] = False
    return pipe(prompts, **kwargs).images


def prepare_sampler(pipe, device: str):
    """An inference pipeline set up for throughput: half precision on GPUs (the family's: fp16, bf16
    for the flow transformers, whose activations overflow fp16), SDPA attention, channels_last."""
    import torch

    from . import families

    fam = families.BY_PIPELINE.get(type(pipe).__name__, families.SD)
    pipe = pipe.to(device, getattr(torch, fam.inference_half) if device == "cuda" else torch.float32)
    denoiser = getattr(pipe, fam.denoiser)
    fam.set_attention(denoiser)
    denoiser.to(memory_format=torch.channels_last)  # a transformer's only 4-D weight is its patch embedding
    return pipe


def sampler_scheduler(model_scheduler, kind: str):
    if kind == "model" or "FlowMatch" in type(model_scheduler).__name__:  # DPM++ here is for DDPM-type schedules
        return model_scheduler
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(model_scheduler.config, algorithm_type="dpmsolver++")


def load_sr_components(ref: str, s3: S3Settings | None = None, skip: frozenset = frozenset(), partitioned=None):
    """An SR model's parts, as its family loads them: DeepFloyd IF stage II (6 input channels: noisy
    image + upsampled low-res image; T5 text) or the Stable Diffusion x4 upscaler (7: noisy latents +
    low-res image; CLIP text, a VAE). `image_noising_scheduler` is the schedule that noise-augments the
    low-res input in both. `skip`: parts not to load (None in the dict), `partitioned`: the UNet's loader
    (engine.partitioned_loader: built sharded under ZeRO-3), as for `load_components`."""
    from diffusers import UNet2DConditionModel

    from . import families

    path = resolve(ref, s3)
    try:
        unet = UNet2DConditionModel.load_config(path, subfolder="unet")
        conditioned = unet.get("class_embed_type") is not None or unet.get("num_class_embeds") is not None
        if unet.get("in_channels") not in (6, 7) or not conditioned:
            raise ModelError(f"sr.model {ref!r}: its UNet is not a super-resolution UNet (6 or 7 input channels, "
                             "noise-level class labels)")
        fam = families.X4 if unet["in_channels"] == 7 else families.IF_STAGE_II
        return fam.load_parts(path, partitioned, skip=frozenset(skip))
    except OSError as e:
        raise ModelError(f"sr.model {ref!r}: cannot load an IF stage II or x4 upscaler pipeline ({e})") from None


def identifier_warnings(tokenizer, identifier: str, class_noun: str) -> list[str]:
    """What is wrong with an identifier for this tokenizer: it should be one rare token, not the class."""
    out = []
    pieces = tokenizer.tokenize(identifier)
    if len(pieces) > 1:
        out.append(f"identifier {identifier!r} is {len(pieces)} tokens ({' '.join(pieces)}) for this model; "
                   "a single rare token binds the subject more cleanly")
    if identifier.strip().lower() == class_noun.strip().lower():
        out.append(f"identifier {identifier!r} is the class noun itself; the subject would overwrite the class")
    return out
