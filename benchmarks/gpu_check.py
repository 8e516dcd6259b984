"""`make gpu-check`: the GPU tests, then the SD1.5-shape benchmark through Ray Train, on one GPU.

    .venv/bin/python benchmarks/gpu_check.py [--skip-tests] [--skip-bench] [--bench-steps N] [-k EXPR]

On a GPU machine with no network (a lent one: CUDA torch, but no Ray, DeepSpeed or diffusers), build
the packages here with `bash benchmarks/device_bundle.sh`, carry `.gpu/` there, and run
`source .gpu/setup.sh && python3 benchmarks/gpu_check.py`. Each GPU test is a whole job on Ray
(2-3 min on an H100: most of it Ray and process start-up), so the seven take ~17 min; `-k` picks some.

1. Where torch sees no CUDA device it stops at once (exit 2) and says what is missing.
2. `pytest -m gpu tests/gpu`: quickstart-size jobs through Ray Train on the GPU (NCCL): bf16,
   bf16-weights and fp16 over ZeRO-2 and ZeRO-3, LoRA, the SR stage, a killed-worker resume.
   Shown as it runs and written to benchmarks/results/gpu-check.txt, under a header naming the
   machine, the versions and the commit.
3. benchmarks/ray_bench.py: the SD1.5-shaped model in a Ray Train worker against the standalone
   bench, same config, same run -> benchmarks/results/bench-sd15-ray.json (its output is appended
   to gpu-check.txt too).

Exit status: 0 when both parts passed, else the first failure's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_bench import cuda_problem  # noqa: E402  (light: imports torch only when called)

PROBE = """
import json, torch, ray, deepspeed, diffusers
props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
print(json.dumps({"gpus": [f"{p.name} ({p.total_memory / 2**30:.0f} GiB)" for p in props],
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "nccl": str(torch.cuda.nccl.version()), "ray": ray.__version__,
                  "deepspeed": deepspeed.__version__, "diffusers": diffusers.__version__}))
"""


def header() -> str:
    """Machine, versions and commit; probed in a child process so this one never holds a CUDA context."""
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT)
    info = probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else probe.stderr[-500:]
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()  # noqa: E731
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"# make gpu-check, {now}\n# commit {git('rev-parse', '--short', 'HEAD')}{dirty}\n# {info}\n"


def tee(cmd: list[str], log, title: str) -> int:
    """Run `cmd`, its output shown and appended to `log` line by line."""
    line = f"\n## {title}: {' '.join(cmd)}\n"
    sys.stdout.write(line)
    log.write(line)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as proc:
        for text in proc.stdout:
            sys.stdout.write(text)
            log.write(text)
            log.flush()
    line = f"## {title}: exit status {proc.returncode}\n"
    sys.stdout.write(line)
    log.write(line)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--bench-steps", type=int, default=20)
    p.add_argument("-k", dest="select", help="only the GPU tests pytest's -k selects")
    args = p.parse_args(argv)

    problem = cuda_problem()
    if problem:
        print(f"gpu-check: {problem}.\ngpu-check: nothing was run; run it on a machine with an NVIDIA GPU "
              "(the pytest `gpu` tests are skipped here for the same reason).", file=sys.stderr)
        return 2

    RESULTS.mkdir(parents=True, exist_ok=True)
    status = []
    with open(RESULTS / "gpu-check.txt", "w") as log:
        log.write(header())
        if not args.skip_tests:
            select = ["-k", args.select] if args.select else []
            rc = tee([sys.executable, "-m", "pytest", "-m", "gpu", "-v", "--durations=0", *select, "tests/gpu"], log,
                     "GPU tests")
            status.append(rc if rc != 5 else 1)  # 5: no test collected, which here is a failure
        if not args.skip_bench:
            status.append(tee([sys.executable, "benchmarks/ray_bench.py", "--steps", str(args.bench_steps),
                               "--out", str(RESULTS)], log, "SD1.5-shape benchmark through Ray Train"))
    failed = [rc for rc in status if rc]
    print(f"\ngpu-check: {'FAILED' if failed else 'passed'}; log in {RESULTS / 'gpu-check.txt'}")
    return failed[0] if failed else 0


if __name__ == "__main__":
    sys.exit(main())
