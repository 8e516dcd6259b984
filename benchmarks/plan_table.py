"""The README's memory-plan table: per training worker, device memory of DreamBooth on SD 1.5, SDXL,
SD3-medium and Flux.1-dev (their published configs, assets/configs/), full fine-tuning and LoRA, at
512 and 1024 px, 1, 4 and 8 workers, with the defaults (bf16, ZeRO-2, batch 1 + 1 class image), and
the cheapest settings that fit 24, 40 and 80 GB GPUs.

    .venv/bin/python benchmarks/plan_table.py [--models sd15 sdxl] > table.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {"sd15": "runwayml/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
          "sd3": "stabilityai/stable-diffusion-3-medium-diffusers", "flux": "black-forest-labs/FLUX.1-dev"}
SHORT = {"gradient_checkpointing": "ckpt", "mixed_precision": "bf16-weights", "zero_stage": "ZeRO-3", "offload": "offload"}


def change(a, b) -> str:
    out = []
    if a.mixed_precision != b.mixed_precision:
        out.append("bf16-weights")
    if a.gradient_checkpointing != b.gradient_checkpointing:
        out.append("ckpt")
    if a.zero_stage != b.zero_stage:
        out.append(f"ZeRO-{b.zero_stage}")
    if a.offload != b.offload:
        out.append("offload " + ("opt" if b.offload == "optimizer" else "opt+params"))
    return " + ".join(out) or "as is"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8])
    args = ap.parse_args()
    from dreambooth_ray import plan

    print("| model | method | px | workers | weights | grads | optimizer | activations | workspace | device total | host | 24 GB | 40 GB | 80 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in args.models:
        planner = plan.Planner(plan.Layout.read(MODELS[key]))
        for method in ("full", "lora"):
            for res in (512, 1024):
                for n in args.workers:
                    s = plan.Settings(resolution=res, method=method, num_workers=n)
                    p = planner.plan(s)
                    fits = []
                    for gb in (24, 40, 80):
                        f = planner.cheapest_fit(s, gb * plan.GiB)
                        fits.append("no" if f is None else change(s, f.settings))
                    d = p.device
                    print(f"| {key} | {method} | {res} | {n} | " + " | ".join(plan.gb(getattr(d, k)) for k in plan.PARTS)
                          + f" | {plan.gb(d.total)} | {plan.gb(p.host.total)} | " + " | ".join(fits) + " |", flush=True)


if __name__ == "__main__":
    main()
