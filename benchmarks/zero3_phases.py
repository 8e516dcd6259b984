"""What a ZeRO-3 worker holds, phase by phase: the scaled SD 1.5 UNet of plan_memory.py through
engine.initialize (DeepSpeed stage 3, torch AdamW; fp32, or bf16 autocast, full or LoRA) in gloo workers. For each phase of the second
step (forward, backward, optimizer step): the peak RSS above the RSS after warm-up (VmHWM, reset
before each phase), the RSS after it, how much of the model is gathered after forward and backward,
and (rank 0) the largest tensor storages alive after backward, named where they are the optimizer's.
It is what plan.account's ZeRO-3 terms were read from.

    .venv/bin/python benchmarks/zero3_phases.py [--workers 1 2] [--resolution 256] [--precision bf16] [--method lora]
        [--out benchmarks/results/zero3_phases.json]

A case other than fp32 full fine-tuning merges its rows into the results file beside the others.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import plan_memory  # noqa: E402

MB = 1 << 20


def storages(ds) -> list:
    """(MB, shape, name) of the largest CPU tensor storages reachable from Python."""
    import torch

    opt, names = ds.optimizer, {}

    def name(label, t):
        if isinstance(t, torch.Tensor):
            names[t.untyped_storage().data_ptr()] = label

    for i, t in enumerate(opt.fp16_partitioned_groups_flat):
        name(f"weights partition {i}", t)
    for i, t in enumerate(opt.fp32_partitioned_groups_flat):
        name(f"fp32 master partition {i}", t)
        for k, v in opt.optimizer.state.get(t, {}).items():
            name(f"AdamW {k} {i}", v)
    name("gradient partitions", opt.grad_partitions_flat_buffer)
    for dtype, bucket in getattr(opt, "ipg_buckets", {}).items():
        name(f"reduce bucket ({dtype}, reduce_bucket_size; only written pages are resident)", bucket.buffer)
    seen = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            st = o.untyped_storage()
            seen[st.data_ptr()] = (round(st.nbytes() / MB, 1), list(o.shape), names.get(st.data_ptr(), "?"))
    return sorted(seen.values(), key=lambda v: -v[0])[:8]


def worker(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from dreambooth_ray import engine, plan

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401

    engine.no_shm_comm()
    s, lay = plan.Settings(**settings), plan_memory.layout()
    plan_memory.warm_up(lay, s)
    base = plan_memory.rss()
    ds, cfg = plan_memory.build(lay, replace(s, zero_stage=3), world)
    g = torch.Generator().manual_seed(rank)
    channels, side = lay.latent_shape(s.resolution)
    rec: dict = {}

    def reset():
        engine.release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS

    def mark(phase):
        rec[phase] = {"peak_mb": round((plan_memory.rss("VmHWM") - base) / MB, 1),
                      "after_mb": round((plan_memory.rss() - base) / MB, 1)}
        reset()

    def gathered():  # bytes of the parameters whose full data is present now
        return round(sum(p.ds_numel * p.element_size() for p in ds.module.parameters() if p.data.numel() > 0) / MB, 1)

    for k in range(2):  # the first step records DeepSpeed's trace of the modules; the second runs by it
        reset()
        x = torch.randn(s.rows, channels, side, side, generator=g)
        cond = {"encoder_hidden_states": torch.randn(s.rows, 77, plan_memory.CLIP["hidden_size"], generator=g)}
        loss, _, _ = engine.denoise_loss(ds, x, torch.full((s.rows,), 500), torch.randn(x.shape, generator=g),
                                         s.batch_size, 1.0, torch.device("cpu"), engine.autocast_dtype(cfg), **cond)
        rec[f"step{k}_gathered_after_forward_mb"] = gathered()
        mark(f"step{k}_forward")
        ds.backward(loss)
        rec[f"step{k}_gathered_after_backward_mb"] = gathered()
        if k == 1 and rank == 0:
            rec["storages_after_backward"] = storages(ds)
        mark(f"step{k}_backward")
        ds.step()
        rec[f"step{k}_gathered_after_step_mb"] = gathered()
        mark(f"step{k}_step")
    persistent = [p for p in ds.module.parameters() if getattr(p, "ds_persist", False)]
    rec.update(persistent_mb=round(sum(p.ds_numel * p.element_size() for p in persistent) / MB, 1),
               persistent_params=len(persistent),
               model_mb=round(sum(p.ds_numel * p.element_size() for p in ds.module.parameters()) / MB, 1))
    Path(out, f"{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--method", default="full", choices=["full", "lora"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zero3_phases.json"))
    args = ap.parse_args()
    import torch.multiprocessing as mp

    from dreambooth_ray import plan

    os.environ.update(plan_memory.ENV)  # read by the spawned workers' malloc and oneDNN
    planner = plan.Planner(plan_memory.layout(), cache_dir=tempfile.mkdtemp())
    rows = []
    for world in args.workers:
        s = plan.Settings(resolution=args.resolution, zero_stage=3, num_workers=world, mixed_precision=args.precision,
                          method=args.method, checkpoint_async=False)
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(worker, args=(world, plan_memory.free_port(), asdict(s), tmp), nprocs=world,
                               start_method="spawn")
            ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(world)]
        p = planner.plan(s, gpu=False)
        row = {"workers": world, "resolution": args.resolution, "mixed_precision": args.precision,
               "method": args.method, "ranks": ranks,
               "planned_mb": {k: round(getattr(p.device, k) / MB, 1) for k in plan.PARTS} | {"total": round(p.device.total / MB, 1)},
               "activations_traced_mb": round(planner.trace(s).peak(0) / MB, 1)}
        rows.append(row)
        peak = max(v["peak_mb"] for r in ranks for k, v in r.items() if k.startswith("step1_") and isinstance(v, dict))
        print(f"{world} worker(s): peak {peak:.0f} MB over the second step, planned {row['planned_mb']['total']:.0f} MB; "
              + ", ".join(f"{k[6:]} {v['peak_mb']:.0f}" for k, v in ranks[0].items() if k.startswith("step1_") and isinstance(v, dict)),
              flush=True)
    case = ("workers", "resolution", "mixed_precision", "method")
    if Path(args.out).exists():  # merge: other cases' rows as they were (rows before this field: fp32 full)
        old = [{"mixed_precision": "fp32", "method": "full", **r} for r in json.loads(Path(args.out).read_text())["rows"]]
        new = {tuple(r[k] for k in case): r for r in rows}
        rows = [new.pop(tuple(r[k] for k in case), r) for r in old] + list(new.values())
    Path(args.out).write_text(json.dumps({"layout": {"unet": plan_memory.UNET}, "rows": rows}, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
