"""Packed subjects: N subjects' LoRA adapters trained in one step over one frozen base model.

DreamBooth's batch is a subject photo and a class image: far too small to keep an accelerator busy,
and each subject pays the base model's kernel launches alone. With LoRA the subjects share the frozen
base and differ only in their adapters, so a pack runs one forward and one backward over every
subject's rows (subject-major: [s0 subject rows; s0 class rows; s1 ...]), each row going through its
own subject's adapter: one batched matmul over an [N, rows x tokens, features] view per adapted layer.

Equal to training each subject alone, because nothing couples them: rows are independent (GroupNorm
and attention are per sample), the loss is the SUM of the subjects' own DreamBooth losses (so each
adapter's gradient is its solo gradient), AdamW is elementwise, each subject's rows, noise and
timesteps come from the generator its solo run uses, and gradients are clipped per subject (DeepSpeed
clips over all parameters at once: its clipping is off here). fp16 is refused: its one loss scale and
skipped steps would couple the subjects. The subjects of a pack share every setting that shapes a step,
so they also finish together (no weight decay on a finished one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import engine, snapshot
from .data import DreamBoothData, step_generator
from .errors import UserError
from .loss import prior_preservation_loss
from .spec import TrainConfig


class PackError(UserError, ValueError):
    """Settings that packing cannot train as the subjects' solo runs would."""


def problems(cfg: TrainConfig, family=None) -> list[str]:
    """Why these settings cannot be packed (empty: they can)."""
    return [f"train.pack {p}" for p in cfg.pack_problems()]


class PackedLoRALinear(torch.nn.Module):
    """A frozen Linear plus N subjects' adapters: y = base(x) + scale * B_i A_i x for subject i's rows.
    The batch is subject-major with the same number of rows per subject, so x viewed as [N, -1, in]
    puts subject i's rows (and tokens) in slice i: two batched matmuls, no gather or scatter."""

    def __init__(self, base: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float):
        super().__init__()
        self.base_layer, self.scale = base, scale
        self.lora_A = torch.nn.Parameter(A)  # [N, r, in]
        self.lora_B = torch.nn.Parameter(B)  # [N, out, r]

    def forward(self, x):
        y = self.base_layer(x)
        n = self.lora_A.shape[0]
        if x.shape[0] % n:
            raise ValueError(f"a packed layer of {n} subjects got a batch of {x.shape[0]} rows")
        xs = x.reshape(n, -1, x.shape[-1])
        d = torch.bmm(torch.bmm(xs, self.lora_A.transpose(1, 2).to(xs.dtype)), self.lora_B.transpose(1, 2).to(xs.dtype))
        return y + self.scale * d.view(y.shape)


def pack_lora(denoiser, family, cfg: TrainConfig, seeds: list[int]) -> list[str]:
    """Replaces each LoRA target of `denoiser` (frozen) with a PackedLoRALinear of len(seeds) adapters,
    adapter i initialised exactly as peft initialises a solo run's after torch.manual_seed(seeds[i])
    (the same draws, in the same order: each is made by peft and taken out again). Returns the
    adapted modules' names."""
    from peft.tuners.lora import LoraLayer

    inits = []
    for seed in seeds:
        torch.manual_seed(seed)
        family.add_lora({family.denoiser: denoiser}, cfg.model_copy(update={"lora": cfg.lora.model_copy(
            update={"text_encoder": False})}))
        layers = {n: m for n, m in denoiser.named_modules() if isinstance(m, LoraLayer)}
        bad = [n for n, m in layers.items() if not isinstance(m.get_base_layer(), torch.nn.Linear)]
        if bad:
            raise PackError(f"train.lora.target_modules: packing adapts Linear layers only, not {bad[0]} "
                            f"({type(layers[bad[0]].get_base_layer()).__name__})")
        inits.append({n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone(),
                          m.scaling["default"]) for n, m in layers.items()})
        denoiser.unload_lora()  # the plain base layers back, for the next subject's draws
    for name in inits[0]:
        parent, _, leaf = name.rpartition(".")
        holder = denoiser.get_submodule(parent) if parent else denoiser
        A = torch.stack([i[name][0] for i in inits])
        B = torch.stack([i[name][1] for i in inits])
        setattr(holder, leaf, PackedLoRALinear(getattr(holder, leaf), A, B, inits[0][name][2]))
    return list(inits[0])


def subject_state_dict(module: torch.nn.Module, i: int, prefix: str = "", dtype=None) -> dict[str, torch.Tensor]:
    """Subject i's adapter in the key layout of its solo run's state dict (peft's
    `<layer>.lora_A.default.weight`), so the solo export path (export.pipeline_with) loads it unchanged."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, PackedLoRALinear):
            for k in ("lora_A", "lora_B"):
                t = getattr(m, k)[i].detach()
                out[f"{prefix}{name}.{k}.default.weight"] = t.to("cpu", dtype or t.dtype, copy=True)
    return out


def unpacked(state_dict: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Subject i's adapter from a pack's checkpoint ({'unet.<layer>.lora_A': [N, r, in], ..}), in its solo
    run's keys: what the job exports from when the workers' own export is missing."""
    return {f"{k}.default.weight": v[i] for k, v in state_dict.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def clip_per_subject(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scales each subject's gradients (slice i of every packed parameter) as DeepSpeed scales a solo
    run's: by max_norm / (norm + 1e-6) when that is below 1. Returns the subjects' norms."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([g.float().flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # [N]
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
    return norms


@dataclass
class Member:
    """One subject of a pack: what engine.build takes for a solo run."""

    instance: list
    classes: list
    instance_text: str
    class_text: str
    seed: int  # its solo run's train.seed: its adapter's initialisation and its step generators
    geometry: list | None = None
    frozen: engine.FrozenInputs | None = None
    masks: list | None = None  # each photo's subject mask or None (masked loss)
    captions: list | None = None  # each photo's own instance prompt or None


@dataclass
class PackedEngine:
    """The pack's DeepSpeed engine (ZeRO-0: the adapters are replicated, their optimizer state is small)."""

    ds: object
    data: list[DreamBoothData]
    seeds: list[int]
    cfg: TrainConfig
    inputs: dict  # diffusion_inputs' keyword arguments
    texts: list[dict]  # each subject's prompt conditioning: its step rows, or its prompt table with captions
    fixed: dict  # conditioning every row shares (the family's fixed_conditioning)
    prior_weight: float
    max_norm: float
    family: object
    checkpoint_wait: float = 0.0
    norms: torch.Tensor | None = field(default=None, repr=False)  # the last step's per-subject gradient norms

    def step(self, step: int, rank: int = 0) -> torch.Tensor:
        """One optimizer step; returns [N, (loss, subject loss, prior loss)], averaged over micro-steps."""
        cfg, n = self.cfg, len(self.data)
        device = self.ds.device
        sums = torch.zeros(n, 3, device=device)
        for micro in range(cfg.gradient_accumulation):
            xs, ts, targets, weights, rcs, conds, masks = [], [], [], [], [], [], []
            for data, seed, text in zip(self.data, self.seeds, self.texts):  # the solo runs' draws, subject by subject
                g = step_generator(seed, step, micro, rank)
                rows, n_inst, rc, extras = data.batch(cfg.batch_size, g, with_cond=True, with_extras=True)
                x, t, target, w = engine.diffusion_inputs(rows=rows, g=g, **self.inputs)
                xs.append(x), ts.append(t), targets.append(target), weights.append(w), rcs.append(rc)
                masks.append(extras["mask"])
                if extras["caption"] is not None:  # as engine.build's loss: photo rows their caption, class rows the class prompt
                    last = len(next(iter(text.values()))) - 1
                    pick = torch.cat([extras["caption"], torch.full((len(rows) - n_inst,), last)]).to(device)
                    text = {k: v[pick] for k, v in text.items()}
                conds.append(text)
            cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
            cond.update(self.fixed)
            if rcs[0] is not None:
                cond[self.family.row_key] = torch.cat(rcs).to(device)
            x = torch.cat(xs)
            autocast = engine.autocast_dtype(cfg)
            with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                pred = self.ds(x, torch.cat(ts), **cond)
            target = torch.cat(targets)
            if pred.shape[1] == 2 * target.shape[1]:  # learned variance (IF): the noise half, as denoise_loss
                pred = pred[:, : target.shape[1]]
            pred, target = pred.float(), target.float()
            if weights[0] is not None:  # as denoise_loss: MSE on sqrt(w)-scaled rows
                w = torch.cat(weights).float().sqrt().view(-1, *[1] * (pred.dim() - 1)).to(device)
                pred, target = pred * w, target * w
            if any(m is not None for m in masks):  # each subject's loss as its solo run's (loss.py), mask and all
                r = len(pred) // n
                out = [prior_preservation_loss(pred[i * r:(i + 1) * r], target[i * r:(i + 1) * r], n_inst,
                                               self.prior_weight, masks[i]) for i in range(n)]
                losses, inst, prior = (torch.stack(v) for v in zip(*out))
            else:  # the same, one reduction for every subject
                parts = 2 if self.data[0].with_prior else 1
                err = (pred - target).pow(2).view(n, parts, -1).mean(2)  # [N, subject | prior]
                inst = err[:, 0]
                prior = err[:, 1] if parts == 2 else torch.zeros_like(inst)
                losses = inst + self.prior_weight * prior
            self.ds.backward(losses.sum())  # each adapter's gradient is its own subject's alone
            if self.ds.is_gradient_accumulation_boundary():
                self.norms = clip_per_subject([p for p in self.ds.module.parameters() if p.requires_grad],
                                              self.max_norm)
            self.checkpoint_wait += snapshot.settle(self.ds)
            self.ds.step()
            sums += torch.stack([losses.detach(), inst.detach(), prior.detach()], 1).to(sums.device)
        return sums / cfg.gradient_accumulation

    def lr(self) -> float:
        return self.ds.lr_scheduler.get_last_lr()[0]

    def subject_state_dict(self, i: int, dtype=None) -> dict[str, torch.Tensor]:
        """Subject i's adapter as its solo run's export reads it ({'unet.<layer>.lora_A.default.weight': ..})."""
        return subject_state_dict(self.ds.module, i, "", dtype)


def ds_config(cfg: TrainConfig) -> dict:
    """DeepSpeed's config for a pack: ZeRO-0 and no clipping of its own (clip_per_subject does it)."""
    c = engine.deepspeed_config(cfg)
    return {**c, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}}


def build(parts: dict, members: list[Member], cfg: TrainConfig, prior_weight: float, device: torch.device,
          fused: bool | None = None) -> PackedEngine:
    """One engine training every member's adapter over the shared base in `parts`, each as
    engine.build would train it alone (with train.seed = member.seed)."""
    from .families import SD

    family = parts.get("family") or SD
    bad = problems(cfg, family)
    if bad:
        raise PackError("; ".join(bad))
    if len({bool(m.classes) for m in members}) > 1:
        raise PackError("the subjects of a pack all have class images or none do")
    dtype = engine.weight_dtype(cfg)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    inputs: dict = {"noise_scheduler": parts["noise_scheduler"], "dtype": dtype, "device": device,
                    "channels_last": cfg.channels_last, "family": family, "cfg": cfg}
    frozen = [m.frozen or engine.frozen_inputs(parts, m.instance, m.classes, m.instance_text, m.class_text, cfg, device,
                                               m.masks, m.captions) for m in members]
    data = []
    for m, f in zip(members, frozen):
        rc = family.row_conditioning(m.geometry or [None] * len(m.instance), cfg.resolution, cfg.random_flip)
        cc = family.row_conditioning([None] * len(m.classes), cfg.resolution, cfg.random_flip) if m.classes else None
        _, caption_rows = engine.prompt_table(m.instance_text, m.class_text, cfg, bool(m.classes), m.captions)
        caps = (None if caption_rows is None else
                torch.tensor(caption_rows).view(-1, 1).expand(-1, 2 if cfg.random_flip else 1).contiguous())
        if f.instance is not None:
            data.append(DreamBoothData.of_pools(f.instance, f.classes, cfg.random_flip, rc, cc, masks=f.masks,
                                                captions=caps))
            inputs.update(scaling_factor=f.scaling_factor, shift_factor=f.shift_factor)
        else:
            masks = DreamBoothData.mask_pool(engine.used_masks(m.masks, cfg, len(m.instance)), cfg.random_flip)
            data.append(DreamBoothData(m.instance, m.classes, cfg.random_flip, row_cond=rc, class_cond=cc,
                                       masks=masks, captions=caps))
    if frozen[0].instance is None and family.latent:
        inputs["vae"] = parts["vae"].requires_grad_(False).to(device, torch.float32 if family.vae_fp32 else dtype)
    denoiser = parts[family.denoiser].train()
    with engine.fp32_view(denoiser):  # a base loaded in bf16 (engine.partitioned_loader): fp32 adapters, as solo
        pack_lora(denoiser, family, cfg, [m.seed for m in members])
    if cfg.mixed_precision == "bf16":
        engine.freeze_to(denoiser, torch.bfloat16)
    engine.configure_denoiser(denoiser, cfg, family)
    texts = [{k: v.to(device, dtype) for k, v in f.conditioning.items()} for f in frozen]
    fixed = family.fixed_conditioning(cfg, denoiser)
    for name in engine.frozen_parts(family, cfg) | set(family.text_encoders):
        parts[name] = None
    model = engine.DreamBoothModel(denoiser, family=family)
    ds = engine.initialize(model, cfg, device, fused, config=ds_config(cfg))
    return PackedEngine(ds, data, [m.seed for m in members], cfg, inputs, texts, fixed, prior_weight,
                        engine.deepspeed_config(cfg)["gradient_clipping"], family)
