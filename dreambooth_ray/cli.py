"""`dreambooth-ray run JOB.yaml`: run a job on a local Ray instance (started here) or a given cluster."""

from __future__ import annotations

import argparse
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
        # --address auto for that). No dashboard: half the start-up time and memory.
        address = "local"
        kwargs.setdefault("include_dashboard", False)
        # One machine has no node drains to watch for: skip Ray Train's per-run watcher actor (a
        # Python process per fit, a few CPU-seconds each on a small machine).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address=address, runtime_env={"env_vars": _worker_env()}, logging_level=logging.WARNING, **kwargs)


def cmd_run(args, console: Console) -> int:
    from .job import run_job
    from .spec import load_spec

    spec = load_spec(args.job)
    init_ray(args.address)
    t0 = time.perf_counter()
    results = run_job(spec, console)
    table = Table(title=f"job {spec.name} ({time.perf_counter() - t0:.0f} s)")
    for col in ("subject", "status", "steps", "final loss", "time", "output / error"):
        table.add_column(col, overflow="fold")
    for r in results:
        loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "-"
        table.add_row(r.name, r.status, str(r.steps), loss, f"{r.seconds:.0f} s", r.error or r.model)
    Console(width=max(120, Console().width)).print(table)
    failed = [r.name for r in results if r.status == "failed"]
    if failed:
        console.print(f"[red]{len(failed)} subject(s) failed:[/] {', '.join(failed)}; re-run the job to retry them")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreambooth-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job spec on a local Ray instance (or --address)")
    run.add_argument("job", help="job spec YAML")
    run.add_argument("--address", default=None,
                     help="an existing Ray cluster ('auto', or host:port); default: start a local instance")
    run.set_defaults(fn=cmd_run)
    from . import identifiers, k8s, submit

    bench = sub.add_parser("bench", help="time our training path against the standard DreamBooth recipe")
    bench.set_defaults(fn=lambda a, c: __import__("dreambooth_ray.bench").bench.cmd_bench(a, c))
    from .bench import add_arguments

    add_arguments(bench)

    submit.add_commands(sub)
    k8s.add_commands(sub)
    identifiers.add_commands(sub)
    from .eval import add_commands as add_eval

    add_eval(sub)
    args = parser.parse_args(argv)

    console = Console(stderr=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)])
    from .eval import EvalError
    from .images import ImageError
    from .models import ModelError
    from .spec import SpecError
    from .storage import StorageError

    from .k8s import K8sError
    from .submit import SubmitError

    try:
        return args.fn(args, console)
    except (SpecError, ImageError, ModelError, StorageError, SubmitError, K8sError, EvalError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
