"""A whole job's cost per subject with `train.pack` against without, through `dreambooth-ray run`
(job.run_job on one local Ray instance), in one run on the same machine.

    .venv/bin/python benchmarks/packed_job.py [--subjects 8] [--steps 50] [--model toy] [--cpus N]

Both jobs do the same work from an empty storage root: N LoRA subjects (no class images), each
trained `steps` steps, exported, its samples rendered. `lanes` (the baseline): pack 1, the subjects
through the training lanes at the default concurrency (as many 1-CPU lanes as the CPUs allow, less one
on the driver's node: one lane on 2 CPUs); `packed`: pack N, one Ray Train run for all N. Unlike
benchmarks/packed_lora.py (the training step alone, in-process), this counts what a lane pays per
subject: its model load and engine set-up, checkpoints, export. Prints and writes JSON: each
makespan, seconds per subject, the ratio, and the mean per-subject timeline of each.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from dreambooth_ray import job
from dreambooth_ray.cli import init_ray
from dreambooth_ray.spec import parse_spec
from dreambooth_ray.tiny import make_subject_images


def spec_for(root: Path, photos: Path, n: int, steps: int, model: str, pack: int):
    return parse_spec({
        "name": "bench", "model": model, "storage": str(root),
        "subjects": [{"name": f"s{i}", "images": str(photos / f"s{i}"), "class": "toy"} for i in range(n)],
        "prior": {"enabled": False},
        "train": {"resolution": 32, "steps": steps, "checkpoint_every": steps, "num_workers": 1, "method": "lora",
                  "mixed_precision": "fp32", "max_failures": 0, "pack": pack},
        "samples": {"prompts": ["a {identifier} {class_noun}"], "inference_steps": 2},
    })


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="benchmarks/results/packed_job.json")
    args = ap.parse_args()
    init_ray(num_cpus=args.cpus)
    n = args.subjects
    times, timelines = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        for i in range(n):
            make_subject_images(photos / f"s{i}", n=3, seed=i)
        for label, pack in (("lanes", 1), ("packed", n)):
            t0 = time.perf_counter()
            results = job.run_job(spec_for(Path(tmp) / label, photos, n, args.steps, args.model, pack))
            times[label] = time.perf_counter() - t0
            assert all(r.status == "done" for r in results), [(r.name, r.error) for r in results]
            keys = sorted({k for r in results for k in r.timeline})
            timelines[label] = {k: round(sum(r.timeline.get(k, 0) for r in results) / n, 2) for k in keys}
            print(f"{label}: {times[label]:.1f} s", flush=True)
    out = {
        "subjects": n, "steps": args.steps, "model": args.model, "cpus": args.cpus,
        "makespan_s": {k: round(v, 1) for k, v in times.items()},
        "seconds_per_subject": {k: round(v / n, 2) for k, v in times.items()},
        "packed_over_lanes": round(times["packed"] / times["lanes"], 3),
        "mean_timeline": timelines,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
