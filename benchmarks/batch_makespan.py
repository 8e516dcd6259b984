"""Cost per subject in a batch: N tiny subjects, three ways, in one run on one local Ray instance.

    .venv/bin/python benchmarks/batch_makespan.py [--subjects 8] [--steps 4] [--cpus N]

- one_job_per_subject (the baseline): each subject its own job, one after another, as a user
  without batches would run them: a worker group, imports and model load per subject;
- batch_one_lane: all subjects in one job with max_concurrent_subjects: 1, so one training lane
  (one worker group) trains them one after another;
- batch_default: all subjects in one job at the default concurrency (as many lanes as the CPUs allow,
  less one CPU on the driver's node: on 2 CPUs, one lane).

Every variant does the same work from an empty storage root: class images for 2 classes, N trainings,
N exports with samples. Prints and writes JSON: each makespan, seconds per subject, the makespans'
ratios to the baseline, and each variant's mean per-subject timeline (seconds by stage, bytes moved).
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


def spec_for(root: Path, photos: Path, subjects: list[int], steps: int, concurrent: int | None):
    return parse_spec({
        "name": "bench", "model": "tiny", "storage": str(root), "max_concurrent_subjects": concurrent,
        "subjects": [{"name": f"s{i}", "images": str(photos / f"s{i}"), "class": "toy" if i % 2 else "cup"}
                     for i in subjects],
        "prior": {"num_class_images": 4, "inference_steps": 4, "batch_size": 2},
        "train": {"resolution": 32, "steps": steps, "checkpoint_every": steps, "num_workers": 1,
                  "zero_stage": 2, "mixed_precision": "fp32", "max_failures": 0},
        "samples": {"prompts": ["a {identifier} {class_noun}"], "inference_steps": 2},
    })


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--out", default="benchmarks/results/batch_makespan.json")
    args = ap.parse_args()
    init_ray(num_cpus=args.cpus)
    n = args.subjects
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        for i in range(n):
            make_subject_images(photos / f"s{i}", n=3, seed=i)
        variants = {"one_job_per_subject": [([i], 1) for i in range(n)],
                    "batch_one_lane": [(list(range(n)), 1)],
                    "batch_default": [(list(range(n)), None)]}
        times, timelines = {}, {}
        for label, jobs in variants.items():
            t0, results = time.perf_counter(), []
            for subjects, conc in jobs:
                results += job.run_job(spec_for(Path(tmp) / label, photos, subjects, args.steps, conc))
            times[label] = time.perf_counter() - t0
            assert all(r.status == "done" for r in results), [(r.name, r.error) for r in results]
            keys = sorted({k for r in results for k in r.timeline})
            timelines[label] = {k: round(sum(r.timeline.get(k, 0) for r in results) / n, 2) for k in keys}
            print(f"{label}: {times[label]:.1f} s", flush=True)
    base = times["one_job_per_subject"]
    out = {
        "subjects": n, "steps": args.steps, "cpus": args.cpus,
        "makespan_s": {k: round(v, 1) for k, v in times.items()},
        "seconds_per_subject": {k: round(v / n, 1) for k, v in times.items()},
        "makespan_ratio_to_one_job_per_subject": {k: round(v / base, 3) for k, v in times.items()},
        "mean_timeline": timelines,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    ray.shutdown()


if __name__ == "__main__":
    main()
