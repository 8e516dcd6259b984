"""The SD1.5-shaped model trained through Ray Train on one GPU, against the standalone bench, in one run.

    .venv/bin/python benchmarks/ray_bench.py [--steps 20] [--warmup 5] [--zero-stages 0,2] [--out benchmarks/results]

`dreambooth-ray bench --size sd15` (dreambooth_ray/bench.py) times `engine.build` in its own process
with a process group of its own: no Ray. Here one model and one config run both ways:

- standalone: a fresh process that runs the bench's own `bench.time_training(bench.Ours, ...)`;
- ray: a TorchTrainer (use_gpu=True: the GPU Ray assigns, Ray Train's NCCL process group) whose one
  worker loads the model as the product does (`models.load_components` from a folder), builds
  `engine.build` and times the same steps; then times more steps with what the product's
  `train_loop` adds to each (an all_reduce of the losses and a `ray.train.report`).

Both use the bench's GPU recipe (512 px, batch 1 + 1 class image, bf16 autocast over fp32 weights,
the bench's random images) at each ZeRO stage asked for: 0 is the bench's own setting, 2 the
product's default. The model is `tiny.sd15_pipeline()` (random weights, nothing downloaded), saved
once to a temporary folder that both load. Peak memory is the CUDA allocator's peak over setup and
steps, as the bench measures it. Writes <out>/bench-sd15-ray.json; fails at once without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES, N_INSTANCE, N_CLASS = 512, 5, 8  # bench.run's: images(5, res, 0), images(max(4, class_images=8), res, 1)


def cuda_problem() -> str | None:
    """Why this machine cannot run GPU checks, or None."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (f"no CUDA: torch {torch.__version__} is a CPU-only build (this venv has the CPU install); "
                "a GPU check needs a CUDA build of torch and an NVIDIA GPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
            + "; check `nvidia-smi` and the driver")


def train_config(zero: int, steps: int) -> dict:
    # bench.run's `base` config on a GPU, at the given ZeRO stage.
    return {"resolution": RES, "batch_size": 1, "mixed_precision": "bf16", "zero_stage": zero,
            "learning_rate": 1e-5, "steps": steps}


def standalone(model_dir: str, cfg: dict, steps: int, warmup: int) -> dict:
    """The bench's own measurement, in this (fresh) process: no Ray."""
    import torch

    from dreambooth_ray import bench, models
    from dreambooth_ray.spec import TrainConfig

    device = torch.device("cuda")
    bench._init_single_process_group(device)
    pipe = models.load_pipeline(model_dir)
    r = bench.time_training(bench.Ours, pipe, TrainConfig(**cfg), device, bench.images(N_INSTANCE, RES, 0),
                            bench.images(N_CLASS, RES, 1), steps, warmup)
    return {**r, "device": torch.cuda.get_device_name()}


def ray_worker(config: dict) -> None:
    """One Ray Train worker: the product's model loading and engine, timed like bench.time_training."""
    import json
    import os
    import tempfile
    import time
    from pathlib import Path

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from dreambooth_ray import bench, engine, models
    from dreambooth_ray.spec import TrainConfig

    steps, warmup = config["steps"], config["warmup"]
    cfg = TrainConfig(**config["cfg"])
    device = ray.train.torch.get_device()
    instance, classes = bench.images(N_INSTANCE, RES, 0), bench.images(N_CLASS, RES, 1)
    t0 = time.perf_counter()
    parts = models.load_components(config["model_dir"])
    load_s = time.perf_counter() - t0
    with bench.PeakMemory(device) as mem:
        t0 = time.perf_counter()
        eng = engine.build(parts, instance, classes, "a sks toy", "a toy", cfg, 1.0, device)
        bench.sync(device)
        setup = time.perf_counter() - t0
        for s in range(warmup):
            eng.step(s)
        bench.sync(device)
        # The step alone, as the standalone bench times it.
        t0 = time.perf_counter()
        for s in range(warmup, warmup + steps):
            loss = eng.step(s)[0].item()
        bench.sync(device)
        compute = time.perf_counter() - t0
        # The step with what train_loop adds: the losses all-reduced (on the device: NCCL), one report.
        # Train V2 hands reports to the controller through a queue of one that it drains once per poll
        # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a report per step paces the loop at that poll.
        t0 = time.perf_counter()
        for s in range(warmup + steps, warmup + 2 * steps):
            sums = eng.step(s).to(device)
            dist.all_reduce(sums)
            ray.train.report({"step": s + 1, "loss": sums[0].item()})
        bench.sync(device)
        product = time.perf_counter() - t0
    n = 2 * cfg.batch_size  # subject + class rows per step
    out = {
        "steps_per_s": steps / compute, "samples_per_s": steps * n / compute, "setup_s": setup, "load_s": load_s,
        "peak_mem_gb": mem.peak / 2**30, "final_loss": loss,
        "steps_per_s_with_report": steps / product,
        "device": torch.cuda.get_device_name(device), "device_index": str(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "process_group_backend": str(dist.get_backend()), "world_size": dist.get_world_size(),
    }
    # With a checkpoint: Train V2's Result keeps only what was reported with one.
    with tempfile.TemporaryDirectory() as d:
        Path(d, "bench.json").write_text(json.dumps(out))
        ray.train.report({"bench_done": 1}, checkpoint=ray.train.Checkpoint.from_directory(d))


def ray_path(model_dir: str, cfg: dict, steps: int, warmup: int, storage: str, name: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    result = TorchTrainer(
        ray_worker,
        train_loop_config={"model_dir": model_dir, "cfg": cfg, "steps": steps, "warmup": warmup},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=True),  # Ray's default backend with GPUs: NCCL
        run_config=RunConfig(name=name, storage_path=storage),
    ).fit()
    with result.checkpoint.as_directory() as d:
        r = json.loads(Path(d, "bench.json").read_text())
    r["fit_wall_s"] = time.perf_counter() - t0
    return r


def run_standalone_process(model_dir: str, cfg: dict, steps: int, warmup: int, tmp: str) -> dict:
    """The standalone bench in a fresh process: its own CUDA context and process group, gone after."""
    out = Path(tmp) / f"standalone-zero{cfg['zero_stage']}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--standalone", model_dir, "--config", json.dumps(cfg), "--steps", str(steps),
           "--warmup", str(warmup), "--result-file", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps (per path, per config)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--zero-stages", default="0,2", help="comma-separated ZeRO stages to time (0: the bench's)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tmp", default=None, help="where to save the ~4 GB model (default: the system temp dir)")
    p.add_argument("--standalone", metavar="MODEL_DIR", help=argparse.SUPPRESS)  # the child process
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    problem = cuda_problem()
    if problem:
        print(f"ray_bench: {problem}. Nothing was run.", file=sys.stderr)
        return 2
    if args.standalone:
        r = standalone(args.standalone, json.loads(args.config), args.steps, args.warmup)
        Path(args.result_file).write_text(json.dumps(r))
        return 0

    import ray
    import torch

    from dreambooth_ray import tiny
    from dreambooth_ray.cli import init_ray

    stages = [int(z) for z in args.zero_stages.split(",")]
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="ray-bench-") as tmp:
        model_dir = str(Path(tmp) / "sd15")
        t0 = time.perf_counter()
        tiny.sd15_pipeline().save_pretrained(model_dir)  # no process group here: transformers writes the weights
        print(f"ray_bench: SD1.5-shape model saved in {time.perf_counter() - t0:.0f} s", flush=True)
        init_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < 1:
            print("ray_bench: torch sees CUDA but the Ray instance has no GPU resource", file=sys.stderr)
            return 2
        import deepspeed
        import diffusers

        result: dict = {"size": "sd15", "torch": torch.__version__, "ray": ray.__version__,
                        "deepspeed": deepspeed.__version__, "diffusers": diffusers.__version__,
                        "steps": args.steps, "warmup": args.warmup, "resolution": RES,
                        "note": "ray/standalone: steps/s of the same step (engine.build, bench recipe) in a Ray "
                                "Train worker (NCCL) vs the standalone bench's process; 'with report' adds "
                                "train_loop's per-step all_reduce and ray.train.report",
                        "configs": {}}
        for z in stages:
            cfg = train_config(z, args.steps)
            print(f"ray_bench: ZeRO-{z}: standalone bench ...", flush=True)
            alone = run_standalone_process(model_dir, cfg, args.steps, args.warmup, tmp)
            print(f"ray_bench: ZeRO-{z}: standalone {alone['steps_per_s']:.2f} steps/s; Ray Train worker ...",
                  flush=True)
            via_ray = ray_path(model_dir, cfg, args.steps, args.warmup, str(Path(tmp) / "ray"), f"bench-sd15-zero{z}")
            result["device"] = alone.pop("device")
            result["configs"][f"zero{z}"] = {
                "train": cfg, "standalone": alone, "ray": via_ray,
                "ratio_steps_per_s": via_ray["steps_per_s"] / alone["steps_per_s"],
                "ratio_steps_per_s_with_report": via_ray["steps_per_s_with_report"] / alone["steps_per_s"],
                "ratio_peak_mem": via_ray["peak_mem_gb"] / alone["peak_mem_gb"],
            }
        ray.shutdown()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-sd15-ray.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsd15 on {result['device']}: Ray Train worker vs standalone bench ({args.steps} timed steps)")
    print(f"{'config':8} {'standalone':>11} {'ray':>8} {'ray+report':>11} {'ratio':>6} {'peak GB':>15}")
    for name, c in result["configs"].items():
        print(f"{name:8} {c['standalone']['steps_per_s']:11.2f} {c['ray']['steps_per_s']:8.2f} "
              f"{c['ray']['steps_per_s_with_report']:11.2f} {c['ratio_steps_per_s']:6.2f} "
              f"{c['standalone']['peak_mem_gb']:7.2f} -> {c['ray']['peak_mem_gb']:5.2f}")
    print(f"-> {out / 'bench-sd15-ray.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
