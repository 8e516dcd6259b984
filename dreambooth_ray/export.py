"""Export: the trained weights become a diffusers pipeline folder (or LoRA adapter) plus a job record,
written by the training workers at the last step, or from the final (ZeRO-sharded) checkpoint."""

from __future__ import annotations

import json
import platform
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from . import checkpoint, models
from .spec import JobSpec, SpecError
from .storage import Storage, io_counts


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


def trained_pipeline(spec: JobSpec, ckpt_dir: str, stage: str = "base", pack_index: int | None = None):
    """The stage's pipeline (base, or the SR one) with the trained weights (or LoRA adapters) from a
    checkpoint folder (a pack's: its subject `pack_index`'s). The family loads it through its own pipeline class."""
    sd = checkpoint.consolidated_state_dict(ckpt_dir)
    if pack_index is not None:
        from .pack import unpacked

        sd = unpacked(sd, pack_index)
    return pipeline_with(spec, sd, stage)


def pipeline_with(spec: JobSpec, state_dict: dict[str, torch.Tensor], stage: str = "base",
                  dtype: torch.dtype = torch.float32, pipe=None):
    """The stage's pipeline with trained weights {'unet.x': .., 'text_encoder.y': ..} loaded, all in
    `dtype` (the base model is loaded in it: an export never holds an fp32 copy of a 16-bit one).
    `pipe`: one this made before for the same spec, stage and dtype, whose trained weights (every one of
    them: the checks below) are replaced: a pack's subjects export through one pipeline."""
    ref = spec.model if stage == "base" else spec.sr.model
    family = models.family(ref, spec.s3, role="base" if stage == "base" else "sr")
    lora = stage == "base" and spec.train.method == "lora"
    if pipe is None:
        pipe = models.load_pipeline(ref, spec.s3, torch_dtype=dtype)
        if lora:
            family.add_lora(pipe, spec.train)
            pipe.to(dtype=dtype)  # the adapters too
    parts = split_state_dict({k: v.to(dtype) for k, v in state_dict.items()})
    for part, sd in parts.items():
        result = getattr(pipe, part).load_state_dict(sd, strict=not lora)
        if lora and result.unexpected_keys:
            raise RuntimeError(f"checkpoint has {part} weights the adapter lacks: {result.unexpected_keys[:3]}")
    if lora:  # non-strict (the base weights are not in a LoRA checkpoint), so check the adapters are
        adapters = {f"{part}.{k}" for part in family.lora_parts(True) for k, _ in
                    getattr(pipe, part).named_parameters() if "lora_" in k}
        missing = sorted(adapters - {f"{part}.{k}" for part, sd in parts.items() for k in sd})
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trained adapter weights, e.g. {missing[:3]}")
    family.after_training(pipe, spec)
    return pipe


EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def live_state_dict(ds, cfg, rank: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    """The trained weights as they are now, on rank 0 (None elsewhere), in `dtype` (default: their
    own); every rank calls it. LoRA: the adapters alone (the base weights never change)."""
    keep = (lambda k: "lora_" in k) if cfg.method == "lora" else (lambda k: True)
    if cfg.zero_stage == 3:
        return gathered_state_dict(ds.module, rank, dtype, keep)
    if rank != 0:
        return None
    return {k: v.detach().to("cpu", dtype or v.dtype, copy=True) for k, v in ds.module.state_dict().items() if keep(k)}


def gathered_state_dict(module, rank: int, dtype=None, keep=lambda k: True, chunk: int = 1 << 26):
    """ZeRO-3's sharded weights gathered onto rank 0 (a collective: every rank calls it), up to `chunk`
    elements at a time and cast to `dtype` as they arrive: rank 0 holds the exported weights in the
    export's precision plus one chunk, never the whole model at training precision."""
    import deepspeed

    out: dict | None = {} if rank == 0 else None
    # Tied weights (T5's shared embedding) are one parameter under several names: gather it once, emit each name.
    names: dict[int, list[str]] = {}
    unique = []
    for k, p in module.named_parameters(remove_duplicate=False):
        if keep(k):
            if id(p) not in names:
                names[id(p)] = []
                unique.append(p)
            names[id(p)].append(k)
    batch, size = [], 0
    for i, p in enumerate(unique):  # the same order on every rank
        batch.append(p)
        size += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if size >= chunk or i == len(unique) - 1:
            with deepspeed.zero.GatheredParameters(batch):
                if out is not None:
                    for q in batch:
                        t = q.data.detach().to("cpu", dtype or q.dtype, copy=True)
                        out.update({n: t for n in names[id(q)]})
            batch, size = [], 0
    if out is not None:  # persistent buffers (not partitioned): a position table, say
        params = {k for k, _ in module.named_parameters(remove_duplicate=False)}
        out.update({k: v.detach().to("cpu", dtype or v.dtype, copy=True) if v.is_floating_point() else v.cpu()
                    for k, v in module.state_dict().items() if k not in params and keep(k)})
    return out


def export_dtype(spec: JobSpec, stage: str = "base") -> str:
    """`train.export_dtype`, or the stage's family's default (fp16; bf16 for SD3 and Flux)."""
    chosen = spec.stage_train(stage).export_dtype
    if chosen:
        return chosen
    ref, role = (spec.model, "base") if stage == "base" else (spec.sr.model, "sr")
    return models.family(ref, spec.s3, role=role).export_dtype


# Where each stage's exported model and its record go, under the subject's outputs.
FOLDERS = {"base": ("model", "export.json"), "sr": ("sr", "sr_export.json")}


def from_engine(ds, spec: JobSpec, storage: Storage, out: tuple[str, ...], run: str, rank: int,
                timeline: dict | None = None, stage: str = "base") -> dict | None:
    """The stage's exported model, written by its training workers at the end of training: no
    checkpoint (optimizer state included) is downloaded and merged on one CPU to export.

    Every rank calls it (ZeRO-3 gathers the sharded weights); rank 0 writes the model in the stage's
    `export_dtype` (base: `<out>/model`, or `<out>/lora`; SR: `<out>/sr`) and its record (FOLDERS),
    and returns that record. Returns None where the live weights are not the trained ones at the
    requested precision (fp32 asked of a bf16-weights/fp16 run, whose fp32 master copy lives in the
    optimizer): the job then exports from the final checkpoint, as it also does when this fails.
    """
    import time

    cfg, t0 = spec.stage_train(stage), time.perf_counter()
    name = export_dtype(spec, stage)
    if name == "fp32" and cfg.mixed_precision in ("bf16-weights", "fp16"):
        return None
    written = io_counts()[0]
    sd = live_state_dict(ds, cfg, rank, EXPORT_DTYPES[name])
    if rank != 0:
        return None
    return from_state_dict(spec, storage, out, run, sd, timeline, stage, t0, written)[0]


def from_state_dict(spec: JobSpec, storage: Storage, out: tuple[str, ...], run: str, sd: dict[str, torch.Tensor],
                    timeline: dict | None = None, stage: str = "base", t0: float | None = None,
                    written: int | None = None, pipe=None) -> tuple[dict, object]:
    """`from_engine`'s model and record, from trained weights already on this rank ({'unet.x': ..}, in the
    stage's export precision): one subject of a pack (pack.PackedEngine.subject_state_dict) exports so.
    Returns (record, the pipeline, for `pipe` of the next subject's export)."""
    import time

    t0 = time.perf_counter() if t0 is None else t0
    written = io_counts()[0] if written is None else written
    name = export_dtype(spec, stage)
    pipe = pipeline_with(spec, sd, stage, dtype=EXPORT_DTYPES[name], pipe=pipe)
    record = {"run": run, "dtype": name, "timeline": dict(timeline or {}),
              **write_model(spec, storage, pipe, out, stage)}
    record["seconds"] = round(time.perf_counter() - t0, 3)
    record["timeline"]["bytes_written"] = record["timeline"].get("bytes_written", 0) + io_counts()[0] - written
    storage.write_json(record, *out, FOLDERS[stage][1])
    return record, pipe


def write_model(spec: JobSpec, storage: Storage, pipe, out: tuple[str, ...], stage: str = "base") -> dict:
    """Write a stage's trained pipeline under `out` (FOLDERS), or with `method: lora` the adapter alone
    (load it onto the base model with load_lora_weights); returns what the records say of it."""
    cfg = spec.stage_train(stage)
    if cfg.method == "lora":
        url, size = save_lora(storage, pipe, out, cfg.lora.text_encoder)
        return {"model": url, "lora": url, "lora_bytes": size, "base_model": spec.model}
    return {"model": save(storage, pipe, out, FOLDERS[stage][0])}


def load_exported(spec: JobSpec, record: dict):
    """An exported model as a pipeline: the full folder, or the base model with the LoRA adapter."""
    if record.get("lora"):
        pipe = models.load_pipeline(record.get("base_model", spec.model), spec.s3)
        pipe.load_lora_weights(models.resolve(record["lora"], spec.s3, marker="pytorch_lora_weights.safetensors"))
        return pipe
    # fp32 in memory, whatever the export's precision: CPU kernels mix no fp16 and fp32, and GPU
    # renderers cast to fp16 themselves (models.prepare_sampler).
    return models.load_pipeline(record["model"], spec.s3, torch_dtype=torch.float32)


def save_lora(storage: Storage, pipe, out: tuple[str, ...], with_text_encoder: bool, family=None) -> tuple[str, int]:
    """Write the adapters as a diffusers LoRA in the format the family's pipeline reads
    (`pipe.load_lora_weights(url)` loads it); returns (URL, bytes)."""
    from . import families

    family = family or families.BY_PIPELINE.get(type(pipe).__name__, families.SD)
    with tempfile.TemporaryDirectory() as tmp:
        family.save_lora(pipe, tmp, with_text_encoder)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        storage.put_dir(tmp, *out, "lora")
    return storage.url(*out, "lora"), size


def save(storage: Storage, pipe, out: tuple[str, ...], folder: str = "model") -> str:
    """Write `<out>/<folder>` in diffusers format; returns its URL."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        load_in_one_precision(Path(tmp))
        storage.put_dir(tmp, *out, folder)
    return storage.url(*out, folder)


def load_in_one_precision(folder: Path) -> None:
    """A plain `DiffusionPipeline.from_pretrained(folder)` of a 16-bit export loads every part in fp32.

    diffusers loads its models (UNet, VAE, transformer) in fp32 unless told otherwise, but transformers 5
    loads a text encoder in the dtype its config.json records: a 16-bit encoder beside an fp32 UNet,
    which fails at the first CPU matmul. The files stay 16-bit; the encoders' configs say fp32, as
    diffusers' own models imply, so `torch_dtype=` still picks one precision for all of them."""
    for config in folder.glob("*/config.json"):
        data = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if data.get(key) in ("float16", "bfloat16"):
                data[key] = "float32"
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def formats_of(family, cfg, asked: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The formats to write beside diffusers': `asked` (the export command's), else `train.export_formats`,
    else all the family writes for the run's method. One the family cannot write is an error naming it."""
    can = family.export_formats(cfg.method)
    asked = asked if asked is not None else cfg.export_formats
    if asked is None:
        return can
    bad = [f for f in asked if f not in can]
    if bad:
        raise SpecError(f"train.export_formats: {', '.join(map(repr, bad))} is not written for a {cfg.method} run of "
                        f"{family.title} (it writes {', '.join(map(repr, can)) or 'the diffusers format only'})")
    return tuple(asked)


def write_formats(spec: JobSpec, subject, storage: Storage, out: tuple[str, ...], pipe, dtype: str,
                  images: list | None = None, formats: tuple[str, ...] | None = None) -> dict:
    """Beside the base stage's diffusers export (`<out>/lora` or `<out>/model`): the files the UIs load
    (formats_of), modelspec/kohya keys in the safetensors headers, the sample `images` ((prompt, PIL image)
    pairs) and a model card, so the folder uploads to the Hub as it is. `pipe`: the exported model, in
    any precision (its weights are written in `dtype`). Returns what job.json records of it."""
    import io

    from . import modelcard

    cfg, family = spec.train, models.family(spec.model, spec.s3)
    lora = cfg.method == "lora"
    folder = "lora" if lora else FOLDERS["base"][0]
    formats = formats_of(family, cfg, formats)
    to = EXPORT_DTYPES[dtype]
    adapter = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha} if lora else None
    title = f"{subject.name} ({spec.name})"
    header = lambda impl: modelcard.metadata(family, pipe, title=title, trigger=subject.instance_text,  # noqa: E731
                                             resolution=cfg.resolution, implementation=impl, lora=adapter,
                                             output_name=subject.name)
    files, urls = {}, {}
    if lora:  # the diffusers file gets the header too: SD3 / Flux users load it in ComfyUI
        name = "pytorch_lora_weights.safetensors"
        data = storage.read_bytes(*out, folder, name)
        storage.write_bytes(modelcard.with_metadata(data, header(modelcard.IMPL_DIFFUSERS)), *out, folder, name)
        comfy = ", ComfyUI (Load LoRA)" if family.comfy_reads_diffusers_lora else ""
        files[name] = "diffusers `load_lora_weights`" + comfy
    else:
        files["model_index.json and the part folders"] = "diffusers `from_pretrained`"
    ui_file = f"{subject.name}.safetensors"
    if "kohya" in formats:
        put_safetensors(storage, family.kohya_lora_state_dict(pipe, cfg.lora.text_encoder), to,
                        header(modelcard.IMPL_LDM), *out, folder, ui_file)
        files[ui_file] = "AUTOMATIC1111, Forge, ComfyUI (kohya's LoRA layout)"
        urls["kohya"] = storage.url(*out, folder, ui_file)
    if "single_file" in formats:
        put_safetensors(storage, family.single_file_state_dict(pipe), to, header(modelcard.IMPL_LDM),
                        *out, folder, ui_file)
        files[ui_file] = f"{family.single_file_uis} (single-file checkpoint)"
        urls["single_file"] = storage.url(*out, folder, ui_file)
    shown = []
    for k, (prompt, im) in enumerate(images or []):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        storage.write_bytes(buf.getvalue(), *out, folder, "samples", f"{k:02d}.png")
        shown.append((prompt, f"samples/{k:02d}.png"))
    text = modelcard.card(family, title=title, trigger=subject.instance_text, base_model=spec.model, lora=adapter,
                          files=files, samples=shown, steps=cfg.steps)
    storage.write_bytes(text.encode(), *out, folder, "README.md")
    return {"formats": urls, "card": storage.url(*out, folder, "README.md")}


def put_safetensors(storage: Storage, tensors: dict, dtype: torch.dtype, metadata: dict[str, str], *parts: str) -> None:
    from safetensors.torch import save_file

    tensors = {k: (v.to("cpu", dtype) if v.is_floating_point() else v.cpu()).contiguous() for k, v in tensors.items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, f"{tmp}/f.safetensors", metadata=metadata)
        storage.put_file(f"{tmp}/f.safetensors", *parts)


def write_record(spec: JobSpec, storage: Storage, out: tuple[str, ...], record: dict) -> None:
    """`<out>/job.json`: spec, versions, steps and losses. Written last: its presence means complete."""
    record = {
        **record,
        "spec": json.loads(spec.model_dump_json(by_alias=True)),
        "versions": versions(),
        "step": int(record["metrics"].get("step", spec.train.steps)),
        "global_batch": spec.train.global_batch,
    }
    storage.write_json(record, *out, "job.json")

