"""Peak host memory per worker for full fine-tuning under ZeRO-3, at 1, 2 and 4 workers: the
partitioned load (engine.load_partitioned: deepspeed.zero.Init, filled chunkwise) against loading the
whole model on every worker and letting deepspeed.initialize partition it (the old path).
`--method lora` (mixed_precision bf16): LoRA's frozen base loaded partitioned with its shards in bf16
(engine.partitioned_loader) against the old LoRA path, the whole base loaded in fp32, the adapters
added, then the base cast to bf16 (engine.freeze_to). `--stage 2 --modes whole dtype`: the same
LoRA under ZeRO-2, the base loaded whole straight into bf16 (engine.load_whole) against the old path.

The model is Flux's transformer architecture with random weights, ~110M parameters, saved once as
a diffusers folder. Each worker is a process in a gloo group (as Ray Train's CPU workers are) that
loads the transformer, builds the DeepSpeed engine (fp32, AdamW) and takes one optimizer step, so the
optimizer state exists; its peak RSS (VmHWM) and its RSS after imports are recorded.

    .venv/bin/python benchmarks/zero3_memory.py [--workers 1 2 4] [--out benchmarks/results/zero3_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
              num_attention_heads=16, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
              axes_dims_rope=(16, 24, 24))


def rss_mb(field: str = "VmRSS") -> float:
    """VmRSS now, or VmHWM: this process's peak. (Not ru_maxrss: across exec it keeps the forking
    parent's peak, here the process that built and saved the model.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def worker(rank: int, world: int, port: int, folder: str, mode: str, out: str, chunk: int, step: bool,
           method: str = "full", stage: int = 3) -> None:
    """One rank: load (whole, or partitioned), then (unless load-only) engine + one step; writes its RSS."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from diffusers import FluxTransformer2DModel

    from dreambooth_ray import engine, families
    from dreambooth_ray.spec import TrainConfig

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401  (imported by both modes before the baseline: ~120 MB of its own)

    engine.no_shm_comm()
    after_imports = rss_mb()
    lora = method == "lora"
    cfg = TrainConfig(zero_stage=stage, mixed_precision="bf16" if lora else "fp32", learning_rate=1e-4, method=method)
    t0 = time.perf_counter()
    if mode == "partitioned":
        model = engine.load_partitioned(FluxTransformer2DModel, folder, "transformer", engine.deepspeed_config(cfg),
                                        chunk=chunk, dtype=torch.bfloat16 if lora else None)
    elif mode == "dtype":
        model = engine.load_whole(FluxTransformer2DModel, folder, "transformer", torch.bfloat16)
    else:
        model = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
        with torch.no_grad():  # weights are memory-mapped until read: read them, as deepspeed.initialize does
            for q in model.parameters():
                q.sum()
    if lora:  # as engine.build: adapters over an fp32 view of the base, then the base in bf16
        with engine.fp32_view(model):
            families.FLUX.add_lora({"transformer": model}, cfg)
        engine.freeze_to(model, torch.bfloat16)
    loaded = time.perf_counter() - t0
    load_peak = rss_mb("VmHWM")
    if not step:
        Path(out, f"{mode}-{world}-{rank}.json").write_text(json.dumps(
            {"after_imports_mb": round(after_imports, 1), "load_peak_mb": round(load_peak, 1), "peak_mb": round(load_peak, 1),
             "load_s": round(loaded, 2)}))
        return
    ds = engine.initialize(engine.DreamBoothModel(model, family=families.FLUX), cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, 16, 16, 16, generator=g)  # 16 latent channels, 8 x 8 packed tokens
    cond = dict(encoder_hidden_states=torch.randn(1, 32, 256, generator=g),
                pooled_projections=torch.randn(1, 128, generator=g), guidance=torch.tensor(3.5))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lora):
        loss = ds(x, torch.tensor([500.0]), **cond).float().pow(2).mean()
    ds.backward(loss)
    ds.step()
    peak = rss_mb("VmHWM")
    Path(out, f"{mode}-{world}-{rank}.json").write_text(json.dumps(
        {"after_imports_mb": round(after_imports, 1), "load_peak_mb": round(load_peak, 1), "peak_mb": round(peak, 1),
         "load_s": round(loaded, 2)}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 2], metavar=("DOUBLE", "SINGLE"),
                    help="Flux blocks (double-stream, single-stream): 2 2 is ~113M parameters, 8 16 ~ 930M")
    ap.add_argument("--chunk", type=int, default=1 << 22, help="elements rank 0 fills per gather")
    ap.add_argument("--load-only", action="store_true", help="stop after loading (no engine, no step)")
    ap.add_argument("--modes", nargs="+", default=["whole", "partitioned"])
    ap.add_argument("--method", choices=["full", "lora"], default="full",
                    help="lora: rank-4 adapters (Flux's default targets) over a bf16 frozen base")
    ap.add_argument("--stage", type=int, default=3, help="ZeRO stage of the engine (partitioned: 3 only)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zero3_memory.json"))
    args = ap.parse_args()

    import torch
    import torch.multiprocessing as mp
    from diffusers import FluxTransformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        CONFIG.update(num_layers=args.layers[0], num_single_layers=args.layers[1])
        model = FluxTransformer2DModel(**CONFIG)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(Path(tmp) / "transformer")
        del model
        print(f"Flux-architecture transformer, random weights: {n / 1e6:.1f}M parameters "
              f"({n * 4 / 2**20:.0f} MiB in fp32; {n * 16 / 2**20:.0f} MiB with gradients and AdamW's two moments)")
        rows = []
        for world in args.workers:
            for mode in args.modes:
                t0 = time.perf_counter()
                mp.start_processes(worker, args=(world, free_port(), tmp, mode, tmp, args.chunk, not args.load_only,
                                                        args.method, args.stage), nprocs=world,
                                   start_method="spawn")
                ranks = [json.loads(Path(tmp, f"{mode}-{world}-{r}.json").read_text()) for r in range(world)]
                row = {"workers": world, "load": mode, "seconds": round(time.perf_counter() - t0, 1),
                       "peak_rss_mb_max": max(r["peak_mb"] for r in ranks),
                       "peak_rss_mb_per_rank": [r["peak_mb"] for r in ranks],
                       "rss_after_imports_mb": max(r["after_imports_mb"] for r in ranks),
                       "load_peak_mb_above_imports_max": round(max(r["load_peak_mb"] - r["after_imports_mb"]
                                                                   for r in ranks), 1),
                       "model_mb_above_imports_max": round(max(r["peak_mb"] - r["after_imports_mb"] for r in ranks), 1)}
                rows.append(row)
                print(f"{world} worker(s), {mode:11s}: loading {row['load_peak_mb_above_imports_max']:6.0f} MB, "
                      f"training step {row['model_mb_above_imports_max']:6.0f} MB per worker above the "
                      f"{row['rss_after_imports_mb']:.0f} MB after imports (peak RSS {row['peak_rss_mb_max']:.0f} MB), "
                      f"{row['seconds']:.0f} s")
    result = {"parameters": n, "config": CONFIG, "method": args.method, "zero_stage": args.stage,
              "dtype": "bf16 frozen base, fp32 adapters" if args.method == "lora" else "fp32", "optimizer": "AdamW", "rows": rows,
              "load_only": args.load_only, "chunk": args.chunk, "command": "python " + " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
