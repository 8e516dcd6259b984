"""A memory plan before any compute: per training worker, the expected peak device and host memory,
split into weights, gradients, optimizer state, activations and workspace, and the cheapest settings
that fit a GPU.

Weights, gradients and optimizer state are counted from parameter counts of modules built on the
meta device from the model's config.json files (no weights). Activations are not a constant: one
training forward and backward of the real denoiser (and trained text encoders) at the spec's
resolution and per-worker rows runs under torch's FakeTensorMode, which computes shapes and dtypes
but allocates nothing, while a dispatch mode counts the bytes of every live tensor storage. What
DeepSpeed adds per ZeRO stage (master copies, partitions, buckets) is the arithmetic in `account`.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 1 << 30
# DeepSpeed's defaults, which engine.deepspeed_config leaves as they are.
REDUCE_BUCKET = 500_000_000  # elements: the contiguous gradient bucket (stage 1-3), allocated whole on a GPU
PREFETCH_BUCKET = 50_000_000  # elements: ZeRO-3's parameter prefetch (stage3_prefetch_bucket_size)
MAX_REUSE = 1_000_000_000  # elements: stage3_max_reuse_distance, a gathered layer used again within it stays
PERSISTENCE = 100_000  # elements: stage3_param_persistence_threshold, smaller parameters stay gathered
CUDA_CONTEXT = GiB // 2  # the CUDA context and cuBLAS/cuDNN workspaces, outside the caching allocator
HEADROOM = 0.9  # a plan fits a GPU when it needs at most this share of it (allocator fragmentation)
# Published configs of models the plan knows without the hub (assets/configs/<name>/, config.json only).
ASSETS = Path(__file__).parent / "assets" / "configs"
KNOWN = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-xl-base-1.0": "stable-diffusion-xl-base-1.0",
    "stabilityai/stable-diffusion-3-medium-diffusers": "stable-diffusion-3-medium-diffusers",
    "black-forest-labs/FLUX.1-dev": "FLUX.1-dev",
}


# ---- counting live bytes of a traced step -------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage an op creates until it is freed (a weakref finalizer
    on the storage), on real or fake tensors. Storages that exist before (parameters, inputs) are not
    counted; `timeline` is (live bytes, storage key) after each allocation, so that the gradients'
    share can be told apart once backward has said which storages they are."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # storage address -> (allocation id, bytes)
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes or -bytes), in order
        self._skip: set[int] = set()

    def ignore(self, tensors) -> None:
        self._skip.update(t.untyped_storage()._cdata for t in tensors)

    def _free(self, key: int, ident: int) -> None:
        if key in self.live and self.live[key][0] == ident:
            self.events.append((ident, -self.live.pop(key)[1]))

    def ids(self, tensors) -> set[int]:
        """The allocation ids of live tensors' storages (the gradients, once backward has run)."""
        return {self.live[k][0] for k in (t.untyped_storage()._cdata for t in tensors) if k in self.live}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st._cdata
                if key in self.live or key in self._skip:
                    continue
                ident, n = len(self.events), st.nbytes()
                self.live[key] = (ident, n)
                self.events.append((ident, n))
                weakref.finalize(st, self._free, key, ident)
        return out

    def frontier(self, grads: set[int]) -> list[tuple[int, int]]:
        """(other bytes, gradient bytes) live after each allocation, `grads` being the gradients'
        allocation ids, reduced to the points no other point exceeds in both (the peak of
        other + f x gradients, for any share f of the gradients a ZeRO stage keeps, is on them)."""
        other = grad = 0
        points = []
        for ident, n in self.events:
            if ident in grads:
                grad += n
            else:
                other += n
            if n > 0:
                points.append((other, grad))
        front, best = [], -1
        for o, g in sorted(set(points), key=lambda p: (-p[0], -p[1])):
            if g > best:
                front.append((o, g))
                best = g
        return front


# ---- the model, from its configs ----------------------------------------------------------------

@dataclass
class Layout:
    """What the plan needs of a model, read from its config files (no weights)."""

    family: object
    denoiser: dict  # the denoiser's config.json
    encoders: dict  # {pipeline attribute: (transformers class name, config.json)}
    vae: dict | None
    name: str = ""

    @classmethod
    def read(cls, model: str, s3=None) -> "Layout":
        from . import families
        from .configs import ModelConfigs, model_index

        ref = str(ASSETS / KNOWN[model]) if model in KNOWN else model
        cfgs = ModelConfigs(ref, s3, "model")
        index = model_index(cfgs)
        fam = families.family_for(index, "base")
        encoders = {n: ((index.get(n) or [None, "CLIPTextModel"])[1], cfgs.read(f"{n}/config.json") or {})
                    for n in fam.text_encoders}
        return cls(fam, cfgs.read(f"{fam.denoiser}/config.json") or {}, encoders,
                   cfgs.read("vae/config.json") if fam.latent else None, model)

    def key(self) -> str:
        blob = json.dumps([self.family.name, self.denoiser, self.encoders, self.vae], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def build_denoiser(self):
        return self.family.denoiser_type().from_config(dict(self.denoiser))

    def build_encoder(self, name: str):
        import transformers

        cls = getattr(transformers, self.encoders[name][0])
        return cls(cls.config_class.from_dict(dict(self.encoders[name][1])))

    def latent_shape(self, resolution: int) -> tuple[int, int]:
        """(channels, side) of what is diffused at a resolution."""
        if self.vae is None:  # pixel space (IF)
            return self.denoiser.get("in_channels", 3), resolution
        down = 2 ** (len(self.vae.get("block_out_channels", [0] * 4)) - 1)
        return self.vae.get("latent_channels", 4), resolution // down

    def text_length(self) -> int:
        fam = self.family
        t5 = getattr(fam, "t5", "")
        if fam.name == "sd3":
            return 77 + fam.max_sequence_length  # the CLIP states, then T5's along the sequence
        if t5:
            return fam.max_sequence_length
        return fam.text_length or 77


# ---- the settings that move memory --------------------------------------------------------------

OFFLOADS = ("none", "optimizer", "optimizer+params")


@dataclass(frozen=True)
class Settings:
    """The training settings a plan depends on, read from a TrainConfig with getattr, so settings
    that land later (gradient_checkpointing, offload) are read once they exist."""

    resolution: int = 512
    batch_size: int = 1
    prior: bool = True  # class rows beside the subject rows: 2 x batch_size rows per micro-step
    mixed_precision: str = "bf16"
    zero_stage: int = 2
    num_workers: int = 1
    method: str = "full"
    lora_rank: int = 4
    lora_targets: tuple = ()  # empty: the family's defaults
    lora_text_encoder: bool = False
    lora_text_targets: tuple = ()
    train_text_encoder: bool = False
    cache_latents: bool = True
    gradient_checkpointing: bool = False
    offload: str = "none"
    checkpoint_async: bool = True
    optimizer: str = "adamw"

    @classmethod
    def of(cls, cfg, prior: bool = True) -> "Settings":
        lora = getattr(cfg, "lora", None)
        set_fields = getattr(lora, "model_fields_set", set())
        return cls(
            resolution=getattr(cfg, "resolution", 512), batch_size=getattr(cfg, "batch_size", 1), prior=prior,
            mixed_precision=getattr(cfg, "mixed_precision", "bf16"), zero_stage=int(getattr(cfg, "zero_stage", 2)),
            num_workers=getattr(cfg, "num_workers", 1), method=getattr(cfg, "method", "full"),
            lora_rank=getattr(lora, "rank", 4),
            lora_targets=tuple(lora.target_modules) if lora is not None and "target_modules" in set_fields else (),
            lora_text_encoder=bool(getattr(lora, "text_encoder", False)),
            lora_text_targets=tuple(lora.text_encoder_modules) if lora is not None and "text_encoder_modules" in set_fields else (),
            train_text_encoder=getattr(cfg, "train_text_encoder", False),
            cache_latents=getattr(cfg, "cache_latents", True),
            gradient_checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)),
            offload=getattr(cfg, "offload", "none") or "none",
            checkpoint_async=getattr(cfg, "checkpoint_upload", "async") == "async",
            optimizer=getattr(cfg, "optimizer", "adamw"),
        )

    @property
    def rows(self) -> int:
        return self.batch_size * (2 if self.prior else 1)

    @property
    def zero3(self) -> bool:
        """ZeRO-3 changes the traced step too (zero3_linear)."""
        return self.zero_stage == 3

    @property
    def weight_bytes(self) -> int:
        """Bytes per trained weight as DeepSpeed keeps it (engine.weight_dtype)."""
        return 2 if self.mixed_precision in ("bf16-weights", "fp16") else 4

    @property
    def frozen_bytes(self) -> int:
        """Bytes per frozen weight (engine.frozen_dtype; DeepSpeed's 16-bit engines cast the whole module)."""
        return 4 if self.mixed_precision == "fp32" else 2

    def trained_encoders(self, family) -> tuple[str, ...]:
        lora_te = self.method == "lora" and self.lora_text_encoder
        return tuple(family.trainable_encoders) if self.train_text_encoder or lora_te else ()

    def describe(self) -> str:
        parts = [f"ZeRO-{self.zero_stage}", self.mixed_precision]
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.offload != "none":
            parts.append(f"offload {self.offload}")
        return ", ".join(parts)


# ---- activations: one traced training step -------------------------------------------------------

@dataclass
class Trace:
    """A traced forward + backward: the frontier of (activation bytes, gradient bytes) live at once,
    and the gradients' total. Traced at the spec's own resolution: activations are not proportional to
    pixels (SD 1.5, bf16: 2.1 GB at 256 px, 3.4 GB at 512; the autocast copies of the weights do not
    grow with the image), and a trace takes 6-30 s even for Flux at 1024 px."""

    frontier: list
    grad_bytes: int
    resolution: int
    seconds: float = 0.0

    def peak(self, grad_share: float) -> int:
        """The step's peak of activations plus `grad_share` of the gradients (1: kept whole in .grad,
        as ZeRO 0-1 do during backward; 0: moved out as they come, as ZeRO 2-3 do)."""
        return int(max(a + grad_share * g for a, g in self.frontier))


def _conditioning(layout: Layout, s: Settings, rows: int, dtype) -> dict:
    """The denoiser's text and extra conditioning for `rows` rows, as the family's step feeds it:
    fixed states when the text encoders are frozen, token ids when they train."""
    fam, den, n = layout.family, layout.denoiser, layout.text_length()
    trained = s.trained_encoders(fam)
    cond: dict = {}
    t5 = getattr(fam, "t5", "")
    if trained:
        for key, enc in zip(fam.prompt_keys, fam.text_encoders):
            if enc in trained:
                cond[key] = torch.zeros(rows, 77, dtype=torch.long)
        if t5:
            cond["t5_states"] = torch.zeros(rows, fam.max_sequence_length, layout.encoders[t5][1].get("d_model", 4096))
        if fam.reads_text_mask:
            cond["attention_mask"] = torch.ones(rows, 77, dtype=torch.long)
    elif fam.name in ("sd3", "flux"):
        cond["encoder_hidden_states"] = torch.zeros(rows, n, den["joint_attention_dim"], dtype=dtype)
        cond["pooled_projections"] = torch.zeros(rows, den["pooled_projection_dim"], dtype=dtype)
    else:
        cond["encoder_hidden_states"] = torch.zeros(rows, n, fam.cross_width(den), dtype=dtype)
    if fam.name == "sdxl":
        pooled = den["projection_class_embeddings_input_dim"] - 6 * den["addition_time_embed_dim"]
        if not trained:
            cond["text_embeds"] = torch.zeros(rows, pooled, dtype=dtype)
        cond["time_ids"] = torch.zeros(rows, 6)
    if fam.name == "flux" and den.get("guidance_embeds"):
        cond["guidance"] = torch.tensor(3.5)
    return cond


@contextmanager
def fake_modules():
    """FakeTensorMode in which Module.to works: it swaps fake parameters (swap_tensors), which fails
    on the weak references the mode keeps to them; setting .data instead moves them as well."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    def set_data(t1, t2):
        t1.data = t2.data

    with FakeTensorMode(), mock.patch.object(torch.utils, "swap_tensors", set_data):
        yield


@contextmanager
def zero3_linear(on: bool):
    """torch.nn.functional.linear as ZeRO-3 leaves it: DeepSpeed swaps in its LinearFunctionForZeroStage3
    for the whole process (Init._enable_mem_efficient_linear), which saves every input as it is given
    (torch's linear saves none for a frozen weight, and autocast's bf16 copy otherwise) and no bf16
    copy of the weight. Under bf16 autocast a LoRA layer's input, which peft casts to its fp32
    adapters' dtype, is then kept for backward in fp32 (measured on the scaled SD 1.5 UNet at 512 px:
    462 MB live at the forward's peak, 465 traced with it, 358 without)."""
    if not on:
        yield
        return
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    F = torch.nn.functional
    kept, F.linear = F.linear, zero3_linear_wrap
    try:
        yield
    finally:
        F.linear = kept


def add_lora(fam, denoiser, encoders: dict, s: Settings) -> None:
    """The family's adapters (families.base.add_lora), with the spec's rank and targets."""
    from types import SimpleNamespace

    from .spec import LoraConfig

    lora = {"rank": s.lora_rank, "alpha": float(s.lora_rank), "text_encoder": bool(encoders)}
    lora.update({"target_modules": s.lora_targets} if s.lora_targets else {})
    lora.update({"text_encoder_modules": s.lora_text_targets} if s.lora_text_targets else {})
    fam.add_lora({fam.denoiser: denoiser, **encoders}, SimpleNamespace(lora=LoraConfig(**lora)))


def trace_step(layout: Layout, s: Settings) -> Trace:
    """Run one training forward and backward of the denoiser (and the trained text encoders) under
    FakeTensorMode, counting live bytes: shapes and dtypes as on the GPU, nothing allocated."""
    import time

    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its advice on casting loaded weights, which fake modules have none of
    try:
        t0 = time.perf_counter()
        frontier, grad_bytes = _trace(layout, s)
        return Trace(frontier, grad_bytes, s.resolution, time.perf_counter() - t0)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _trace(layout: Layout, s: Settings) -> tuple[list, int]:
    from types import SimpleNamespace

    from . import engine

    fam, res = layout.family, s.resolution
    half = {"bf16-weights": torch.bfloat16, "fp16": torch.float16}.get(s.mixed_precision)
    with fake_modules():
        den = layout.build_denoiser().train()
        encoders = {n: layout.build_encoder(n).train() for n in s.trained_encoders(fam)}
        if s.method == "lora":
            add_lora(fam, den, encoders, s)
        if s.gradient_checkpointing:
            den.enable_gradient_checkpointing()
        modules = [den, *encoders.values()]
        for m in modules:
            if half is not None:  # DeepSpeed's 16-bit engines cast the whole module
                m.to(half)
            elif s.method == "lora" and s.mixed_precision == "bf16":
                engine.freeze_to(m, torch.bfloat16)  # as engine.build: the frozen base in bf16
        model = engine.DreamBoothModel(den, family=fam, **encoders)
        trained = [p for p in model.parameters() if p.requires_grad]
        dtype = half or torch.float32
        channels, side = layout.latent_shape(res)
        rows = s.rows
        live = LiveBytes()
        live.ignore([*model.parameters(), *model.buffers()])
        with zero3_linear(s.zero3), live:
            x = torch.zeros(rows, channels, side, side, dtype=dtype)
            t = (torch.full((rows,), 500.0) if fam.name in ("sd3", "flux") else torch.full((rows,), 500, dtype=torch.long))
            cond = _conditioning(layout, s, rows, dtype)
            target = torch.zeros(rows, channels, side, side)
            loss, _, _ = engine.denoise_loss(model, x, t, target, s.batch_size if s.prior else rows, 1.0,
                                             torch.device("cpu"), engine.autocast_dtype(SimpleNamespace(mixed_precision=s.mixed_precision)),
                                             **cond)
            loss.backward()
            grads = live.ids([p.grad for p in trained if p.grad is not None])
            grad_bytes = sum(p.numel() * p.element_size() for p in trained)
    return live.frontier(grads), grad_bytes


@dataclass(frozen=True)
class Counts:
    """Parameter counts of what a worker holds: trained (the denoiser, or its LoRA adapters, and
    trained text encoders), frozen on the device (a LoRA base), frozen text encoders (host, after
    their states are computed once), the VAE, the largest single layer (ZeRO-3 gathers layers), and
    what ZeRO-3 keeps gathered for good: the parameters of at most PERSISTENCE elements."""

    trained: int
    frozen: int
    encoders: int
    vae: int
    largest_layer: int
    persistent: int = 0


def count(layout: Layout, s: Settings) -> Counts:
    """Counted on fake modules (no memory), with the LoRA adapters the spec adds."""
    fam = layout.family
    trained_names = s.trained_encoders(fam)
    with fake_modules():
        den = layout.build_denoiser()
        encs = {n: layout.build_encoder(n) for n in layout.encoders}
        if s.method == "lora":
            add_lora(fam, den, {n: encs[n] for n in trained_names}, s)
        on_device = [den, *(encs[n] for n in trained_names)]
        params = [p for m in on_device for p in m.parameters()]
        trained = sum(p.numel() for p in params if p.requires_grad) if s.method == "lora" else sum(p.numel() for p in params)
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in den.modules())
        persistent = sum(p.numel() for p in params if p.numel() <= PERSISTENCE)
        vae = 0
        if layout.vae is not None:
            from diffusers import AutoencoderKL

            vae = sum(p.numel() for p in AutoencoderKL.from_config(dict(layout.vae)).parameters())
    hosted = sum(p.numel() for n, m in encs.items() if n not in trained_names for p in m.parameters())
    return Counts(trained, sum(p.numel() for p in params) - trained, hosted, vae, largest, persistent)


# ---- the plan -----------------------------------------------------------------------------------

PARTS = ("weights", "grads", "optimizer", "activations", "workspace")


@dataclass
class Split:
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    workspace: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, p) for p in PARTS)


@dataclass
class MemoryPlan:
    """Per training worker: expected peak device and host memory (bytes), split by what holds it."""

    settings: Settings
    device: Split
    host: Split
    notes: list = field(default_factory=list)

    def fits(self, gpu_memory: int) -> bool:
        return self.device.total <= HEADROOM * gpu_memory


# fp32 optimizer state per trained element: AdamW's two moments; Prodigy's two, its s and its copy of the
# start point p0; Adafactor (zero_stage 0 only), no moments and a second moment factored over each
# weight's last two dimensions: at most one fp32 (measured 2.2 bytes on the tiny UNet, whose 3x3 convs
# factor over the kernel only; a linear layer's is negligible). Counted at its bound.
STATE_BYTES = {"adamw": 8, "prodigy": 16, "adafactor": 4}


def offload_buffers(counts: Counts, s: Settings, dev: Split, host: Split) -> None:
    """What ZeRO-Offload holds beyond the partitions it moves to the host (`account`'s columns), read off
    DeepSpeed's optimizers and measured phase by phase on a CPU (benchmarks/plan_memory.py --offload).
    ZeRO 1-2 (stage_1_and_2.py): a copy of the weight partition in the weights' dtype, which the CPU Adam
    update is cast through on its way back (param_buffer_of_bit16_for_cpu_offload_groups), and a buffer
    of the largest parameter on each side for gradients in transit; the offloaded gradient partition is
    fp32 whatever the weights' dtype, where the grads column counts w bytes. ZeRO-3 (stage3.py): the fp32
    gradient of each subgroup's master partition, beside the gradient partitions (the grads column).
    A CPU worker holds the same buffers: its device and host are one memory, the sum is what it peaks at."""
    if s.offload == "none" or s.zero_stage == 0:
        return
    P, N, w = counts.trained, s.num_workers, s.weight_bytes
    if s.zero_stage == 3:
        host.grads += 4 * P // N
        return
    host.grads += (4 - w) * P // N
    host.workspace += P * w // N + counts.largest_layer * w  # largest_layer: a bound on the largest parameter
    dev.workspace += counts.largest_layer * w


def account(counts: Counts, trace: Trace, s: Settings, family=None, gpu: bool = True) -> MemoryPlan:
    """The arithmetic of one worker's memory under DeepSpeed (engine.deepspeed_config: ZeRO `stage`,
    torch AdamW, DeepSpeed's default buckets), from parameter counts and a traced step.

    `gpu=False` counts as a CPU worker does (the comparison the tests make on this machine): only the
    touched pages of a gradient bucket, no CUDA context, and torch AdamW's foreach temporaries. Neither
    form counts oneDNN's cache of the kernels it compiles for a CPU's bf16 ops (40 MB on the scaled SD 1.5
    UNet; a GPU's kernels are in its CUDA context), which benchmarks/plan_memory.py turns off."""
    P, F, N, st = counts.trained, counts.frozen, s.num_workers, s.zero_stage
    w, fz = s.weight_bytes, s.frozen_bytes
    params_off = s.offload == "optimizer+params" and st == 3
    opt_off = s.offload != "none" and st >= 1
    shard = N if st == 3 else 1
    part = N if st >= 1 else 1  # ZeRO 1-3 partition the optimizer state
    dev, host = Split(), Split()

    # Weights: trained (w bytes) and frozen (LoRA's base); ZeRO-3 partitions both, offload moves them.
    weights = (P * w + F * fz) // shard
    (host if params_off else dev).weights += weights
    if not s.cache_latents and counts.vae:  # the VAE encodes every step on the device
        vae_fp32 = getattr(family, "vae_fp32", False) or s.mixed_precision == "fp16"
        dev.weights += counts.vae * (4 if vae_fp32 else w)

    # Optimizer: its fp32 state (STATE_BYTES), and DeepSpeed's fp32 master copy (always under ZeRO 1-3,
    # which copy the partition they update; at stage 0 only for 16-bit weights).
    master = 4 * P if (st >= 1 or w == 2) else 0
    (host if opt_off else dev).optimizer += (STATE_BYTES.get(s.optimizer, 8) * P + master) // part

    # Gradients. ZeRO-0 keeps every gradient in .grad through backward; ZeRO 1-3 copy each, as it is
    # produced, into the worker's partition (measured: stage 1 peaks where stage 2 does), through the
    # contiguous bucket, which is allocated at the first gradient and freed after the step. DeepSpeed's
    # 16-bit optimizers add fp32 gradients: a whole accumulator at stage 0, the partition at the step.
    G = trace.grad_bytes  # P x w: the trained parameters' gradients in the traced (DeepSpeed's) dtype
    share = 1.0 if st == 0 else 1.0 / N
    held = int(share * G)
    if st == 0 and w == 2:
        held += 4 * P
    (host if opt_off and st >= 1 else dev).grads += held
    bucket = 0
    if st >= 1 or N > 1:  # a GPU's caching allocator takes the bucket whole; a CPU maps the pages written
        bucket = REDUCE_BUCKET * w if gpu else min(REDUCE_BUCKET, P) * w
    dev.workspace += bucket

    # Activations: the traced step's peak of activations + the gradients (and, on a CPU, the bucket's
    # pages) live at each moment, less what the columns above already count; or what the optimizer
    # step adds once activations are gone (the fp32 gradient partition of a 16-bit run; on a CPU,
    # torch AdamW's foreach temporary, the size of what it updates), if more.
    on_device = 0.0 if opt_off and st >= 1 else share  # offloaded: the partition fills on the host
    filled = on_device + (min(1.0, REDUCE_BUCKET / max(P, 1)) if bucket and not gpu else 0.0)
    backward = trace.peak(filled) - int(filled * G)
    step = 0 if opt_off else (4 * P // N if w == 2 and st >= 1 else 0) + (0 if gpu else 4 * P // part)
    dev.activations = max(0, backward, step)

    if st == 3:  # what stage 3 holds beyond its partitions (read phase by phase off benchmarks/zero3_phases.py)
        # Gathered parameters, in workspace. A worker that gathers (several workers, or parameters on the
        # host) keeps the persistent ones whole beside their partition, and at the end of the forward every
        # layer whose backward comes within stage3_max_reuse_distance: with the default, all of a model
        # under 0.5G elements (DeepSpeed's coordinator releases a layer only if not used again within it).
        # One worker without offload uses its shard, which is the whole parameter, in place.
        gathers = N > 1 or params_off and gpu  # a CPU's offloaded partition is where its layer runs: no copy
        per = (P * w + F * fz) / max(P + F, 1)  # bytes per gathered element: trained w, frozen fz
        rest = max(0, P + F - counts.persistent)
        gathered = int(min(rest, MAX_REUSE // 2 + PREFETCH_BUCKET + counts.largest_layer) * per) if gathers else 0
        dev.workspace += (int(counts.persistent * per) if gathers else 0) + gathered
        # Activations at the forward's end beside the gathered layers (their own peak: trace.peak(0));
        # at backward's end the gradient bucket is reduce-scattered through a flat copy of it plus this
        # rank's reduced share; at the step the partition's gradients are flattened into a new fp32
        # tensor (stage3 _prepare_fp32_grad_for_sub_group), beside torch AdamW's temporaries on a CPU.
        flat = min(REDUCE_BUCKET, P) * w
        reduce = flat + flat // N
        step = 0 if opt_off else 4 * P // N + (0 if gpu else 4 * P // part)
        dev.activations = max(trace.peak(0), reduce - gathered, step - gathered, 0)

    # Workspace: the CUDA context.
    if gpu:
        dev.workspace += CUDA_CONTEXT

    # Host: no frozen text encoder (a T5 beside trained CLIPs included) nor a cached-latents VAE: the encode
    # task computes their outputs off the workers (encode.py). Async checkpoints' host buffers (weights and
    # optimizer partition).
    if s.checkpoint_async:
        host.workspace += P * w // shard + (STATE_BYTES.get(s.optimizer, 8) * P + 4 * P) // part
    offload_buffers(counts, s, dev, host)  # ZeRO-Offload's own buffers
    notes = []
    if st == 3 and N == 1:
        notes.append("ZeRO-3 on one worker partitions nothing")
    return MemoryPlan(s, dev, host, notes)


# ---- planning a spec, and the cheapest settings that fit ----------------------------------------

class Planner:
    """Plans for one model: traces and counts are cached per setting that changes them (in memory,
    and on disk under the models cache, so a second `plan` of the same model takes no trace)."""

    def __init__(self, layout: Layout, cache_dir: str | os.PathLike | None = None):
        self.layout = layout
        self._mem: dict[str, object] = {}
        if cache_dir is None:
            from .models import cache_root

            cache_dir = Path(cache_root()) / "plans"
        self.cache_dir = Path(cache_dir)

    def _key(self, s: Settings, *fields: str) -> str:
        blob = json.dumps([self.layout.key(), [getattr(s, f) for f in fields]], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def counts(self, s: Settings) -> Counts:
        key = "c" + self._key(s, "method", "lora_rank", "lora_targets", "lora_text_targets", "train_text_encoder",
                              "lora_text_encoder")
        if key not in self._mem:
            self._mem[key] = count(self.layout, s)
        return self._mem[key]

    def trace(self, s: Settings) -> Trace:
        """A step traced at the spec's resolution, rows and precision (Trace)."""
        key = "t" + self._key(s, "resolution", "rows", "mixed_precision", "method", "lora_rank", "lora_targets",
                              "lora_text_targets", "train_text_encoder", "lora_text_encoder", "gradient_checkpointing",
                              *(("zero3",) if s.zero3 else ()))  # the other stages' traces keep their cached keys
        if key in self._mem:
            return self._mem[key]
        path = self.cache_dir / f"{key}.json"
        try:
            tr = Trace(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            tr = trace_step(self.layout, s)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(asdict(tr)))
            except OSError:
                pass
        self._mem[key] = tr
        return tr

    def plan(self, s: Settings, gpu: bool = True) -> MemoryPlan:
        return account(self.counts(s), self.trace(s), s, self.layout.family, gpu)

    def cheapest_fit(self, s: Settings, gpu_memory: int) -> MemoryPlan | None:
        """The first plan that fits, over candidates ordered by slowdown (`candidates`)."""
        for c in candidates(s):
            p = self.plan(c)
            if p.fits(gpu_memory):
                return p
        return None


# Slowdown rank of each memory-saving change, least first: ZeRO-1/2 cost no measurable step time
# beside ZeRO-0's all-reduce; bf16-weights trains faster (but updates 16-bit weights from an fp32
# master copy, a numerics change); gradient checkpointing recomputes the forward (~+30% step time);
# ZeRO-3 gathers every layer in forward and backward; optimizer offload runs Adam on the CPU and moves
# gradients and weights over PCIe each step; parameter offload also moves every layer each pass.
COSTS = {"zero2": 0, "bf16-weights": 1, "checkpointing": 2, "zero3": 3, "offload-optimizer": 4, "offload-params": 5}


def candidates(s: Settings) -> list[Settings]:
    """The spec's settings, then every combination of the changes above that only adds memory
    savings, ordered by the most expensive change each needs, then by how many."""
    out = []
    for ck in sorted({s.gradient_checkpointing, True}):
        # What the optimizer allows (spec.py): Adafactor ZeRO-0 only, offload AdamW only.
        for st in [0] if s.optimizer == "adafactor" else sorted({s.zero_stage, max(s.zero_stage, 2), 3}):
            for mp in [s.mixed_precision] + (["bf16-weights"] if s.mixed_precision in ("fp32", "bf16") else []):
                for off in OFFLOADS[OFFLOADS.index(s.offload):] if s.optimizer == "adamw" else ["none"]:
                    if off == "optimizer+params" and st != 3 or off != "none" and st == 0:
                        continue
                    c = replace(s, gradient_checkpointing=ck, zero_stage=st, mixed_precision=mp, offload=off)
                    changes = [k for k, on in (("zero2", st in (1, 2) and st != s.zero_stage),
                                               ("bf16-weights", mp != s.mixed_precision),
                                               ("checkpointing", ck != s.gradient_checkpointing),
                                               ("zero3", st == 3 and s.zero_stage != 3),
                                               ("offload-optimizer", off != s.offload and off != "none"),
                                               ("offload-params", off == "optimizer+params" and s.offload != off)) if on]
                    out.append((sorted((COSTS[k] for k in changes), reverse=True), c))
    out.sort(key=lambda x: x[0])
    return [c for _, c in out]


def settings_diff(a: Settings, b: Settings) -> str:
    """The spec lines that turn settings `a` into `b`."""
    keys = {"gradient_checkpointing": "train.gradient_checkpointing", "zero_stage": "train.zero_stage",
            "mixed_precision": "train.mixed_precision", "offload": "train.offload"}
    return ", ".join(f"{v}: {getattr(b, k)}" for k, v in keys.items() if getattr(a, k) != getattr(b, k))


def gb(n: int) -> str:
    return f"{n / GiB:.1f}"


def spec_settings(spec) -> Settings:
    return Settings.of(spec.train, prior=spec.prior.enabled)


def check_fits(spec, gpu_memory: int, planner: Planner | None = None) -> str | None:
    """The preflight's question: None when the spec's plan fits a GPU of `gpu_memory` bytes, else one
    line naming the figure and the cheapest settings that would fit."""
    planner = planner or Planner(Layout.read(spec.model, spec.s3))
    s = spec_settings(spec)
    p = planner.plan(s)
    if p.fits(gpu_memory):
        return None
    line = (f"train: the memory plan needs {gb(p.device.total)} GB per GPU ({s.describe()}; weights "
            f"{gb(p.device.weights)}, grads {gb(p.device.grads)}, optimizer {gb(p.device.optimizer)}, activations "
            f"{gb(p.device.activations)}, workspace {gb(p.device.workspace)}), more than {HEADROOM:.0%} of the "
            f"GPUs' {gb(gpu_memory)} GB")
    fit = planner.cheapest_fit(s, gpu_memory)
    if fit is None:
        return line + "; no setting fits (fewer rows per step, a lower resolution, LoRA, or more workers)"
    return line + f"; {settings_diff(s, fit.settings)} would fit ({gb(fit.device.total)} GB)"


# ---- `dreambooth-ray plan JOB.yaml` ---------------------------------------------------------------

def table(rows: list[tuple[str, MemoryPlan]], title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("settings", "where", *PARTS, "total"):
        t.add_column(col, justify="left" if col in ("settings", "where") else "right")
    for label, p in rows:
        for where, split in (("device", p.device), ("host", p.host)):
            t.add_row(label if where == "device" else "", where, *(gb(getattr(split, k)) for k in PARTS), gb(split.total))
    return t


def cmd_plan(args, console) -> int:
    from rich.console import Console

    from .spec import load_spec

    spec = load_spec(args.job)
    s = spec_settings(spec)
    if args.gpus:
        s = replace(s, num_workers=args.gpus)
    planner = Planner(Layout.read(spec.model, spec.s3))
    p = planner.plan(s)
    rows = [(s.describe(), p)]
    fit = None
    if args.gpu_memory:
        fit = planner.cheapest_fit(s, int(args.gpu_memory * GiB))
        if fit is not None and fit.settings != s:
            rows.append((fit.settings.describe(), fit))
    out = Console(width=max(120, Console().width))
    c = planner.counts(s)
    out.print(table(rows, f"memory per training worker, GB: {spec.model} ({planner.layout.family.title}), "
                          f"{s.method}, {s.resolution} px, {s.rows} rows per micro-step, {s.num_workers} worker(s); "
                          f"{c.trained / 1e6:.1f}M trained, {c.frozen / 1e6:.1f}M frozen parameters"))
    for n in p.notes:
        out.print(f"note: {n}")
    if args.gpu_memory:
        if p.fits(args.gpu_memory * GiB):
            out.print(f"fits a {args.gpu_memory:g} GB GPU as is ({gb(p.device.total)} GB, at most {HEADROOM:.0%} of it)")
        elif fit is None:
            out.print(f"[red]no setting fits a {args.gpu_memory:g} GB GPU[/]: lower the resolution or batch, use LoRA, or add workers")
        else:
            out.print(f"cheapest settings that fit a {args.gpu_memory:g} GB GPU: {settings_diff(s, fit.settings)} "
                      f"({gb(fit.device.total)} GB)")
        return 0 if fit is not None else 1
    return 0
