"""The memory plan against one GPU: SD 1.5 (512 px) and SDXL (1024 px) real architectures, random weights.

    source .gpu/setup.sh && python3 benchmarks/plan_gpu.py [--cases NAME,...] [--steps 5]
    .venv/bin/python benchmarks/plan_gpu.py --traces-only    # here, on the CPU: the plans alone
    .venv/bin/python benchmarks/plan_gpu.py --tiny           # here: the same code path on a tiny UNet

Issue 31's GPU check. For each case, in a fresh process (one rank, NCCL; so each starts from an empty
GPU), the denoiser is built on the GPU from the published config (random weights: memory does not depend
on values), with the plan's own recipe (plan.add_lora, LoRA's frozen base in bf16, gradient
checkpointing), wrapped by `engine.initialize` (DeepSpeed, the product's config) and trained for a warm-up
step and `--steps` timed steps on fixed conditioning (`plan._conditioning`: what the encode task would
hand the workers). Recorded: `torch.cuda.max_memory_allocated` over the whole run (the plan's device
total less its CUDA context, which the allocator does not count), the allocator's reserved peak, the
peak of the timed steps alone, and steps/s. The plan is `Planner.plan(gpu=True)`, traced by this code
(2-11 s a case on 2 CPUs; `--traces-only` prints the plans alone).

Output: benchmarks/results/plan_gpu.json (one row per case; a case that fails, an OOM included, is a row
with its error and the peak reached). Budget: ~30 s a case on an H100 (process start, DeepSpeed, the
steps), 8 cases; the whole command stays under 8 minutes with the bundle's set-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"sd15": ("runwayml/stable-diffusion-v1-5", 512), "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", 1024)}
# name -> (model, method, gradient checkpointing); bf16 autocast, ZeRO-2, batch 1 + 1 class row: the defaults.
CASES = {f"{m}-{method}{'-ckpt' if ck else ''}": (m, method, ck)
         for m in MODELS for method in ("full", "lora") for ck in (False, True)}


def layout(model: str, tiny: bool = False):
    from dataclasses import replace

    from dreambooth_ray import plan

    lay = plan.Layout.read(MODELS[model][0])
    if not tiny:
        return lay
    small = {"block_out_channels": [32] * len(lay.denoiser["block_out_channels"]), "cross_attention_dim": 32,
             "attention_head_dim": 8, "transformer_layers_per_block": 1}
    return replace(lay, denoiser={**lay.denoiser, **small}, name=lay.name + "/tiny")


def settings(case: str, tiny: bool = False):
    from dreambooth_ray import plan

    model, method, ck = CASES[case]
    return plan.Settings(resolution=64 if tiny else MODELS[model][1], method=method, gradient_checkpointing=ck,
                         mixed_precision="bf16", zero_stage=2, num_workers=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank: int, case: str, steps: int, tiny: bool, port: int, out: str) -> None:
    """One rank: build, initialise, train; writes its measurements (or its error) to `out`."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    from dreambooth_ray import engine, plan
    from dreambooth_ray.spec import TrainConfig

    gpu = torch.cuda.is_available() and not tiny
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    row: dict = {"case": case, "device": torch.cuda.get_device_name(0) if gpu else "cpu"}

    def peak(name: str) -> None:
        if gpu:
            row[name + "_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)

    try:
        if gpu:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
        s, lay = settings(case, tiny), layout(CASES[case][0], tiny)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with device:  # random init on the device: SDXL's 2.6B parameters take minutes on a CPU
            unet = lay.build_denoiser().train()
        if s.method == "lora":
            plan.add_lora(lay.family, unet, {}, s)
            engine.freeze_to(unet, torch.bfloat16)  # the frozen base in bf16, as engine.build and the plan do
        if s.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        cfg = TrainConfig(zero_stage=s.zero_stage, mixed_precision=s.mixed_precision, num_workers=1,
                          batch_size=s.batch_size, method=s.method, learning_rate=1e-5)
        ds = engine.initialize(engine.DreamBoothModel(unet.to(device), family=lay.family), cfg, device)
        row["setup_s"] = round(time.perf_counter() - t0, 2)
        row["parameters"] = sum(p.numel() for p in unet.parameters())
        row["trained"] = sum(p.numel() for p in unet.parameters() if p.requires_grad)
        peak("after_setup")
        dtype = engine.weight_dtype(cfg)
        channels, side = lay.latent_shape(s.resolution)
        cond = {k: v.to(device) if v.dim() == 0 else torch.randn(v.shape).to(device, v.dtype) if v.is_floating_point()
                else v.to(device) for k, v in plan._conditioning(lay, s, s.rows, dtype).items()}
        g = torch.Generator(device).manual_seed(0)

        def step() -> None:
            x = torch.randn(s.rows, channels, side, side, generator=g, device=device).to(dtype)
            t = torch.randint(0, 1000, (s.rows,), generator=g, device=device)
            loss, _, _ = engine.denoise_loss(ds, x, t, torch.randn(x.shape, generator=g, device=device), s.batch_size,
                                             1.0, device, engine.autocast_dtype(cfg), **cond)
            ds.backward(loss)
            ds.step()

        step()  # the optimizer state is made here
        if gpu:
            torch.cuda.synchronize()
        peak("after_first_step")
        steady = torch.cuda.memory_allocated(device) if gpu else 0
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)  # the overall peak is kept in the row above
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
        row["steps_per_s"] = round(steps / (time.perf_counter() - t0), 3)
        peak("steps_peak")
        if gpu:
            row["resident_gb"] = round(steady / 2**30, 3)
            row["reserved_peak_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
    except Exception as e:  # an OOM is a result
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        row["traceback"] = traceback.format_exc()[-4000:]
        peak("at_error")
    finally:
        Path(out).write_text(json.dumps(row))
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(case: str, steps: int, tiny: bool, timeout: float) -> dict:
    """One case in a fresh process (the GPU empty at its start and after it)."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "row.json")
        code = (f"import sys; sys.path[:0] = {[str(ROOT), str(Path(__file__).parent)]!r}; import plan_gpu; "
                f"plan_gpu.worker(0, {case!r}, {steps}, {tiny}, {free_port()}, {str(out)!r})")
        try:
            p = subprocess.run([sys.executable, "-c", code], timeout=timeout, capture_output=True, text=True)
            tail = (p.stdout + p.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            return {"case": case, "error": f"timed out after {timeout:.0f} s"}
        return json.loads(out.read_text()) if out.exists() else {"case": case, "error": f"exit {p.returncode}",
                                                                 "output_tail": tail}


def planned(case: str, cache: Path, tiny: bool = False) -> dict:
    from dreambooth_ray import plan

    s = settings(case, tiny)
    p = plan.Planner(layout(CASES[case][0], tiny), cache_dir=cache).plan(s, gpu=True)
    split = {f"{k}_gb": round(getattr(p.device, k) / 2**30, 3) for k in plan.PARTS}
    return {"planned_gb": round(p.device.total / 2**30, 3),
            # what the caching allocator can see: the plan less the CUDA context
            "planned_allocated_gb": round((p.device.total - plan.CUDA_CONTEXT) / 2**30, 3), **split}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    ap.add_argument("--timeout", type=float, default=150, help="seconds a case may take")
    ap.add_argument("--trace-cache", default=None, help="default: a new temporary folder (traces of this code)")
    ap.add_argument("--traces-only", action="store_true", help="trace every case's plan here (CPU) and stop")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet on the CPU: checks the code path, measures nothing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: unknown {', '.join(unknown)} (known: {', '.join(CASES)})")
    cache = Path(args.trace_cache or tempfile.mkdtemp(prefix="plan-traces-"))
    if args.traces_only:
        for c in cases:
            t0 = time.perf_counter()
            print(c, planned(c, cache), f"{time.perf_counter() - t0:.0f} s", flush=True)
        return 0
    if not args.tiny:
        from ray_bench import cuda_problem

        problem = cuda_problem()
        if problem:
            print(f"plan_gpu: {problem}", file=sys.stderr)
            return 2
    out = Path(args.out or RESULTS / ("plan_gpu_tiny.json" if args.tiny else "plan_gpu.json"))
    rows = []
    for c in cases:
        t0 = time.perf_counter()
        row = {**measure(c, args.steps, args.tiny, args.timeout), **planned(c, cache, args.tiny)}
        if "peak_gb" not in row and "after_first_step_gb" in row:
            row["peak_gb"] = max(row["after_first_step_gb"], row.get("steps_peak_gb", 0))
            row["peak / planned_allocated"] = round(row["peak_gb"] / row["planned_allocated_gb"], 3)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        out.write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=2) + "\n")  # kept if a later case hangs
    print(f"-> {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
