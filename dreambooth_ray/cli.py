"""`dreambooth-ray run JOB.yaml`: run a job on a local Ray instance (started here) or a given cluster."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table


def _worker_env() -> dict[str, str]:
    # DeepSpeed JIT-builds a few CPU ops; keep them (and their reuse) in one place per checkout.
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


def init_ray(address: str | None = None, **kwargs) -> None:
    import ray

    if ray.is_initialized():
        return
    if address is None:
        # A fresh local instance, not whatever cluster happens to run on this machine (pass
        # --address auto for that). With the dashboard: it serves the state API, which Ray Train's
        # placement-group cleaner polls (without it, a warning every few seconds) and which
        # console.save_logs reads the workers' logs through.
        address = "local"
        kwargs.setdefault("include_dashboard", True)
        kwargs.setdefault("dashboard_host", "127.0.0.1")
        # Ray's notice that a new local instance has token authentication on (its default, which we keep).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # One machine has no node drains to watch for: skip Ray Train's per-run watcher actor (a
        # Python process per fit, a few CPU-seconds each on a small machine).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Workers print nothing to the console: progress comes through console.Board, their logs go to storage;
    # and Ray's own worker-death paragraphs go to the job's logs folder (we say it in one line).
    kwargs.setdefault("log_to_driver", False)
    from .console import route_ray_errors

    route_ray_errors()
    ray.init(address=address, runtime_env={"env_vars": _worker_env()}, logging_level=logging.WARNING, **kwargs)


def cmd_run(args, console: Console) -> int:
    from .job import run_job
    from .spec import load_spec

    spec = load_spec(args.job)
    init_ray(args.address)
    t0 = time.perf_counter()
    results = run_job(spec, console)
    table = Table(title=f"job {spec.name} ({time.perf_counter() - t0:.0f} s)")
    from .console import format_timeline

    for col in ("subject", "status", "steps", "final loss", "time", "time by stage", "output / error"):
        table.add_column(col, overflow="fold")
    for r in results:
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
        table.add_row(r.name, r.status, str(r.steps), loss, f"{r.seconds:.0f} s", format_timeline(r.timeline),
                      r.error or r.model)
    Console(width=max(120, Console().width)).print(table)
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        console.print(f"[red]{len(failed)} subject(s) failed:[/] {', '.join(failed)}; re-run the job to retry them")
    return 1 if failed else 0


def _lazy(module: str, fn: str):
    """A command whose module (torch, diffusers) is imported only when it runs: `status`, `logs` and
    `--help` answer in about a second, which matters to anything that polls them."""
    return lambda args, console: getattr(importlib.import_module(f"dreambooth_ray.{module}"), fn)(args, console)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=("sd15", "tiny"), default="tiny", help="tiny (CPU) or sd15 (SD 1.5 shapes, GPU)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--class-images", type=int, default=8, help="class images for the generation and e2e timings")
    p.add_argument("--e2e-steps", type=int, default=40, help="training steps in the end-to-end timing")
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile")
    p.add_argument("--prior-actors", type=int, default=0, help="also time prior generation on 1 and N Ray actors")
    p.add_argument("--out", default="benchmarks/results", help="folder for bench-<size>.json and .png")


def main(argv: list[str] | None = None) -> int:
    from . import identifiers, k8s, submit
    from .errors import UserError

    parser = argparse.ArgumentParser(prog="dreambooth-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job spec on a local Ray instance (or --address)")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("--address", default=None,
                     help="an existing Ray cluster ('auto', or host:port); default: start a local instance")
    run.set_defaults(fn=cmd_run)

    p = sub.add_parser("eval", help="the paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) for a finished job")
    p.add_argument("job", help="job spec YAML (its `eval:` section sets prompts, images and metric models)")
    p.add_argument("--address", default=None, help="an existing Ray cluster; default: start a local instance")
    p.add_argument("--images-per-prompt", type=int, default=None)
    p.add_argument("--dino", default=None, help="DINO model: hub id, folder, s3://, 'tiny-dino' or 'toy-dino' (the toy world)")
    p.add_argument("--clip", default=None, help="CLIP model: hub id, folder, s3://, 'tiny-clip' or 'toy-clip' (the toy world)")
    p.set_defaults(fn=_lazy("eval", "cmd_eval"))

    p = sub.add_parser("export", help="write the UIs' formats (kohya LoRA, single-file checkpoint), sample images "
                                      "and model card of subjects already trained, from their exported model")
    p.add_argument("job", help="job spec YAML")
    p.add_argument("--format", nargs="+", choices=("kohya", "single_file"), default=None,
                   help="formats besides diffusers' (default: train.export_formats, else all that apply)")
    p.add_argument("--subject", nargs="+", default=None, help="only these subjects (default: all)")
    p.add_argument("--no-samples", action="store_true", help="render no sample images for the model card")
    p.set_defaults(fn=_lazy("job", "cmd_export"))

    p = sub.add_parser("report", help="rebuild outputs/<job>/report.html from the job's storage")
    p.add_argument("job", help="job spec YAML")
    p.set_defaults(fn=_lazy("report", "cmd_report"))

    p = sub.add_parser("bench", help="time our training path against the standard DreamBooth recipe")
    add_bench_arguments(p)
    p.set_defaults(fn=_lazy("bench", "cmd_bench"))

    p = sub.add_parser("plan", help="memory per training worker (device and host) before any compute, and the "
                                    "cheapest settings that fit a GPU")
    p.add_argument("job", help="job spec YAML")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="the GPUs' memory, e.g. 80")
    p.add_argument("--gpus", type=int, default=None, metavar="N", help="training workers (default: train.num_workers)")
    p.set_defaults(fn=_lazy("plan", "cmd_plan"))

    submit.add_commands(sub)
    k8s.add_commands(sub)
    identifiers.add_commands(sub)
    args = parser.parse_args(argv)

    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    try:
        return args.fn(args, console)
    except UserError as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
