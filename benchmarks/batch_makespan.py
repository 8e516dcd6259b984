"""Batch makespan: N tiny subjects trained concurrently vs one after another, in one run.

    .venv/bin/python benchmarks/batch_makespan.py [--subjects 4] [--steps 4] [--cpus N]

Both variants do the same work from an empty storage root (prior images for 2 classes, N trainings,
N exports with samples) on the same local Ray instance; the sequential one sets
max_concurrent_subjects: 1. Prints and writes JSON with both makespans and their ratio.
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


def spec_for(root: Path, photos: Path, n: int, steps: int, concurrent: int | None):
    return parse_spec({
        "name": "bench", "model": "tiny", "storage": str(root), "max_concurrent_subjects": concurrent,
        "subjects": [{"name": f"s{i}", "images": str(photos / f"s{i}"), "class": "toy" if i % 2 else "cup"}
                     for i in range(n)],
        "prior": {"num_class_images": 4, "inference_steps": 4, "batch_size": 2},
        "train": {"resolution": 32, "steps": steps, "checkpoint_every": steps, "num_workers": 1,
                  "zero_stage": 2, "mixed_precision": "fp32", "max_failures": 0},
        "samples": {"prompts": ["a {identifier} {class_noun}"], "inference_steps": 2},
    })


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="benchmarks/results/batch_makespan.json")
    args = ap.parse_args()
    init_ray(num_cpus=args.cpus)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        for i in range(args.subjects):
            make_subject_images(photos / f"s{i}", n=3, seed=i)
        times = {}
        for label, conc in (("sequential", 1), ("concurrent", None)):
            spec = spec_for(Path(tmp) / label, photos, args.subjects, args.steps, conc)
            t0 = time.perf_counter()
            results = job.run_job(spec)
            times[label] = time.perf_counter() - t0
            assert all(r.status == "done" for r in results), [(r.name, r.error) for r in results]
    out = {
        "subjects": args.subjects, "steps": args.steps, "cpus": args.cpus,
        "sequential_s": round(times["sequential"], 1), "concurrent_s": round(times["concurrent"], 1),
        "makespan_ratio_concurrent_over_sequential": round(times["concurrent"] / times["sequential"], 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
