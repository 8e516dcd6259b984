"""The memory plan (dreambooth_ray/plan.py) against the measured peak of real training steps on this
CPU: a Stable Diffusion 1.5 UNet layout scaled down (channels 64-256 instead of 320-1280, the same
blocks), at 512 px with prior preservation (2 rows), through the real engine (DreamBoothModel,
engine.denoise_loss, engine.initialize: DeepSpeed, torch AdamW), in gloo process groups as Ray
Train's CPU workers are, across ZeRO stages, gradient checkpointing, precision and offload.

Measured: each worker's peak RSS (VmHWM) over its second optimizer step (the first creates the
optimizer state; VmHWM is reset through /proc/self/clear_refs before the second), above its RSS after
imports. glibc's malloc is told to map every block over 64 KB (MALLOC_MMAP_THRESHOLD_), so a freed
tensor leaves RSS at once instead of staying in the heap; and oneDNN's kernel cache is off (ENV). What
is left is what the trace does not see: Python objects, DeepSpeed's small buffers, malloc's heap.

    .venv/bin/python benchmarks/plan_memory.py [--stages 3] [--precision bf16] [--offload] [--out benchmarks/results/plan_memory.json]

`--stages`, `--precision`: only those cases; `--offload`: only the offload cases; their rows replace the
same cases' in the results file. Planned is device + host: on a CPU they are one memory, so an
offload case (DeepSpeed's CPU Adam, the partitions "moved" to the host) measures both.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SD 1.5's UNet config (assets/configs/stable-diffusion-v1-5) with a fifth of its channels.
UNET = dict(block_out_channels=[64, 128, 256, 256], cross_attention_dim=256, attention_head_dim=8,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, layers_per_block=2, norm_num_groups=32,
            in_channels=4, out_channels=4, sample_size=64)
CLIP = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
            max_position_embeddings=77, projection_dim=256)
VAE = dict(block_out_channels=[32, 32, 32, 32], latent_channels=4, norm_num_groups=8)
MMAP_THRESHOLD = str(64 << 10)
# oneDNN's cache of the kernels it JIT-compiles per shape: a CPU's, not a GPU's (whose kernels are in the
# CUDA context the plan counts apart). Off in the measured workers: 40 MB of bf16 kernels here (the bf16
# rows' peaks 1091 -> 1051, LoRA 554 -> 514, LoRA ZeRO-3 752 -> 712 MB), 2 MB in fp32 (1329 -> 1327).
ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}


@contextmanager
def worker_env():
    """ENV for the workers spawned inside: this process (the tests') keeps its malloc and oneDNN as they are."""
    kept = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        yield
    finally:
        for k, v in kept.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def layout():
    from dreambooth_ray import families, plan

    return plan.Layout(families.SD, dict(UNET), {"text_encoder": ("CLIPTextModel", dict(CLIP))}, dict(VAE), "sd15/5")


def rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def warm_up(lay, s) -> None:
    """What the process loads once, before the baseline: the model classes' modules (diffusers, peft),
    and the kernels' code and caches, by a step of the same layout at 1/16 of its width and 64 px."""
    import torch

    from dreambooth_ray import engine, plan

    small = replace(lay, denoiser={**lay.denoiser, "block_out_channels": [32] * 4, "cross_attention_dim": 32})
    unet = small.build_denoiser().train()
    if s.method == "lora":
        plan.add_lora(lay.family, unet, {}, s)
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = engine.DreamBoothModel(unet, family=lay.family)
    x = torch.randn(2, 4, 8, 8)
    loss, _, _ = engine.denoise_loss(model, x, torch.full((2,), 500), x, 1, 1.0, torch.device("cpu"),
                                     torch.bfloat16 if s.mixed_precision == "bf16" else None,
                                     encoder_hidden_states=torch.randn(2, 77, 32))
    loss.backward()
    del model, unet, loss
    engine.release_freed_memory()


def build(lay, s, world: int):
    """The engine over the scaled UNet at settings `s` (torch.distributed initialised), and its TrainConfig."""
    import torch

    from dreambooth_ray import engine, plan
    from dreambooth_ray.spec import TrainConfig

    torch.manual_seed(0)
    unet = lay.build_denoiser().train()
    if s.method == "lora":
        plan.add_lora(lay.family, unet, {}, s)
        if s.mixed_precision == "bf16":
            engine.freeze_to(unet, torch.bfloat16)
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    cfg = TrainConfig(zero_stage=s.zero_stage, mixed_precision=s.mixed_precision, num_workers=world,
                      batch_size=s.batch_size, method=s.method, learning_rate=1e-4, offload=s.offload)
    return engine.initialize(engine.DreamBoothModel(unet, family=lay.family), cfg, torch.device("cpu")), cfg


def worker(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    """One rank: the engine over the scaled UNet, two optimizer steps; writes its peak over the second."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from dreambooth_ray import engine, plan

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401

    engine.no_shm_comm()
    s = plan.Settings(**settings)
    lay = layout()
    warm_up(lay, s)
    base = rss()
    ds, cfg = build(lay, s, world)
    dtype = engine.weight_dtype(cfg)
    g = torch.Generator().manual_seed(rank)
    channels, side = lay.latent_shape(s.resolution)

    def step():
        x = torch.randn(s.rows, channels, side, side, generator=g).to(dtype)
        cond = {"encoder_hidden_states": torch.randn(s.rows, 77, CLIP["hidden_size"], generator=g).to(dtype)}
        loss, _, _ = engine.denoise_loss(ds, x, torch.full((s.rows,), 500), torch.randn(x.shape, generator=g),
                                         s.batch_size, 1.0, torch.device("cpu"), engine.autocast_dtype(cfg), **cond)
        ds.backward(loss)
        ds.step()

    built = rss() - base
    step()
    engine.release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = rss() - base
    t0 = time.perf_counter()
    step()
    Path(out, f"{rank}.json").write_text(json.dumps({"peak": rss("VmHWM") - base, "step_s": time.perf_counter() - t0,
                                                     "built": built, "before_step": before}))
    dist.destroy_process_group()


def step_worker(rank: int, settings: dict, out: str) -> None:
    """The denoiser's training forward and backward alone (no DeepSpeed, no optimizer): the peak of
    activations and gradients that the plan's trace predicts (Trace.peak(1))."""
    import torch

    from dreambooth_ray import engine, plan

    torch.set_num_threads(1)
    s = plan.Settings(**settings)
    lay = layout()
    warm_up(lay, s)
    unet = lay.build_denoiser().train()
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    model = engine.DreamBoothModel(unet, family=lay.family)
    channels, side = lay.latent_shape(s.resolution)
    x = torch.randn(s.rows, channels, side, side)
    cond = {"encoder_hidden_states": torch.randn(s.rows, 77, CLIP["hidden_size"])}
    autocast = torch.bfloat16 if s.mixed_precision == "bf16" else None
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss, _, _ = engine.denoise_loss(model, x, torch.full((s.rows,), 500), torch.randn(x.shape), s.batch_size, 1.0,
                                     torch.device("cpu"), autocast, **cond)
    loss.backward()
    Path(out, "step.json").write_text(json.dumps({"peak": rss("VmHWM") - base}))


def measure_step(settings) -> int:
    """Bytes above the RSS before it that the forward and backward of `step_worker` peak at."""
    import torch.multiprocessing as mp

    with worker_env(), tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(step_worker, args=(asdict(settings), tmp), nprocs=1, start_method="spawn")
        return json.loads(Path(tmp, "step.json").read_text())["peak"]


def forward_worker(rank: int, port: int, settings: dict, out: str) -> None:
    """One training forward through the engine (DeepSpeed at the settings' stage, one gloo worker), its
    tensors counted by plan.LiveBytes as the plan's trace counts fake ones: what the stage's forward
    keeps for backward, without the process's own memory (Python objects, oneDNN's kernels) that RSS
    also holds. ZeRO-3 swaps torch.nn.functional.linear for DeepSpeed's (plan.zero3_linear)."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from dreambooth_ray import engine, plan

    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401

    engine.no_shm_comm()
    s = plan.Settings(**settings)
    lay = layout()
    ds, cfg = build(lay, s, 1)
    channels, side = lay.latent_shape(s.resolution)
    live = plan.LiveBytes()
    # Views of what exists before are no new bytes: the weights, or under ZeRO-3 their shards (not the
    # parameters' empty placeholders, freed once gathered, whose storages' addresses new tensors take).
    live.ignore([getattr(p, "ds_tensor", p) for p in ds.module.parameters()] + list(ds.module.buffers()))
    with live:
        x = torch.randn(s.rows, channels, side, side)
        cond = {"encoder_hidden_states": torch.randn(s.rows, 77, CLIP["hidden_size"])}
        loss, _, _ = engine.denoise_loss(ds, x, torch.full((s.rows,), 500), torch.randn(x.shape), s.batch_size, 1.0,
                                         torch.device("cpu"), engine.autocast_dtype(cfg), **cond)
    Path(out, "forward.json").write_text(json.dumps({"peak": max(o + g for o, g in live.frontier(set())),
                                                     "end": sum(n for _, n in live.live.values())}))
    dist.destroy_process_group()


def measure_forward(settings) -> dict:
    """Live tensor bytes of one forward through a one-worker engine (`forward_worker`): {"peak", "end"}."""
    import torch.multiprocessing as mp

    with worker_env(), tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(forward_worker, args=(free_port(), asdict(settings), tmp), nprocs=1, start_method="spawn")
        return json.loads(Path(tmp, "forward.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(settings, world: int = 1, detail: bool = False):
    """The largest worker's measured peak (bytes above its RSS after imports) over a training step
    (`detail`: each rank's peak, RSS once the engine is built and before the measured step)."""
    import torch.multiprocessing as mp

    with worker_env(), tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(world, free_port(), asdict(settings), tmp), nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
        return ranks if detail else max(r["peak"] for r in ranks)


def planned(settings, planner=None):
    from dreambooth_ray import plan

    planner = planner or plan.Planner(layout(), cache_dir=tempfile.mkdtemp())
    return planner.plan(settings, gpu=False)


CASES = [  # (zero stage, workers, mixed precision, gradient checkpointing, method, offload)
    (0, 1, "fp32", False, "full", "none"), (0, 1, "fp32", True, "full", "none"),
    (1, 1, "fp32", False, "full", "none"),
    (2, 1, "fp32", False, "full", "none"), (2, 1, "fp32", True, "full", "none"),
    (3, 1, "fp32", False, "full", "none"), (3, 1, "fp32", True, "full", "none"),
    (2, 2, "fp32", False, "full", "none"), (3, 2, "fp32", False, "full", "none"),
    (2, 1, "bf16", False, "full", "none"), (2, 1, "bf16", True, "full", "none"),
    (2, 1, "bf16", False, "lora", "none"),
    (3, 2, "bf16", False, "lora", "none"),
    (2, 1, "fp32", False, "full", "optimizer"), (2, 1, "fp32", True, "full", "optimizer"),
    (2, 2, "fp32", False, "full", "optimizer"),
    (3, 1, "fp32", False, "full", "optimizer"), (3, 1, "fp32", False, "full", "optimizer+params"),
    (3, 2, "fp32", False, "full", "optimizer+params"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_memory.json"))
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--offload", action="store_true", help="only the cases with train.offload")
    args = ap.parse_args()
    from dreambooth_ray import plan

    planner = plan.Planner(layout(), cache_dir=tempfile.mkdtemp())
    rows = []
    for stage, world, mp_, ck, method, off in CASES:
        if stage not in args.stages or mp_ not in args.precision or args.offload and off == "none":
            continue
        s = plan.Settings(resolution=args.resolution, zero_stage=stage, num_workers=world, mixed_precision=mp_,
                          gradient_checkpointing=ck, method=method, checkpoint_async=False, offload=off)
        p = planner.plan(s, gpu=False)
        total = p.device.total + p.host.total
        t0 = time.perf_counter()
        m = measure(s, world)
        row = {"zero_stage": stage, "workers": world, "mixed_precision": mp_, "gradient_checkpointing": ck,
               "method": method, "offload": off, "planned_mb": round(total / 2**20, 1), "measured_mb": round(m / 2**20, 1),
               "ratio": round(m / total, 3), **{f"{k}_mb": round(getattr(p.device, k) / 2**20, 1) for k in plan.PARTS},
               **{f"host_{k}_mb": round(getattr(p.host, k) / 2**20, 1) for k in plan.PARTS if getattr(p.host, k)},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    c = planner.counts(plan.Settings())
    def case(r):
        return (r["zero_stage"], r["workers"], r["mixed_precision"], r["gradient_checkpointing"], r["method"],
                r.get("offload", "none"))

    some = set(args.stages) != {0, 1, 2, 3} or set(args.precision) != {"fp32", "bf16"} or args.offload
    if some and Path(args.out).exists():  # merge: other rows as they were
        new = {case(r): r for r in rows}
        old = json.loads(Path(args.out).read_text())["rows"]
        rows = [new.pop(case(r), r) for r in old] + list(new.values())
    Path(args.out).write_text(json.dumps({"layout": {"unet": UNET}, "trained_parameters": c.trained,
                                          "resolution": args.resolution, "rows": rows}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
