"""Cost per subject of LoRA training, packed (pack.py: N subjects in one step) against one lane (the
subjects one after another, each its own engine), on the same machine in one run.

    .venv/bin/python benchmarks/packed_lora.py [--model toy] [--steps 50] [--threads 1] [--sizes 1 2 4 8 16]

Both sides do a run's training work from the loaded model, in this process (a 1-process gloo group, the
real DeepSpeed engine, no Ray): the lane, per subject, a fresh copy of the model, engine.build (frozen
text conditioning, cached latents, peft LoRA, DeepSpeed) and `steps` steps; the pack one pack.build over
all N and `steps` packed steps. What a lane also pays per subject (a Ray Train run's checkpoints,
export, samples) is left out of both, so the ratio is the training step's own. One thread by default,
as a 1-CPU lane worker runs. Runs on CUDA when there is one (not measured yet: no GPU was lent).
"""

import argparse
import copy
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
import record  # noqa: E402

from dreambooth_ray import engine, models, pack  # noqa: E402
from dreambooth_ray.spec import TrainConfig  # noqa: E402


def subjects(n: int, res: int):
    rng = np.random.default_rng(0)
    classes = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(4)]
    return [pack.Member([Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(3)],
                        classes, f"a sks{i} toy", "a toy", seed=0) for i in range(n)]


def lane(parts, members, cfg, device) -> float:
    t0 = time.perf_counter()
    for m in members:
        eng = engine.build(copy.deepcopy(parts), m.instance, m.classes, m.instance_text, m.class_text, cfg, 1.0, device)
        for step in range(cfg.steps):
            eng.step(step)
        del eng
    sync(device)
    return time.perf_counter() - t0


def packed(parts, members, cfg, device) -> float:
    t0 = time.perf_counter()
    eng = pack.build(copy.deepcopy(parts), members, cfg, 1.0, device)
    for step in range(cfg.steps):
        eng.step(step)
    sync(device)
    return time.perf_counter() - t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default="benchmarks/results/packed_lora.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    tmp = tempfile.mkdtemp()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = models.load_components(args.model)
    cfg = TrainConfig(resolution=args.resolution, steps=args.steps, method="lora", mixed_precision=args.precision,
                      zero_stage=2, random_flip=True)
    warm = cfg.model_copy(update={"steps": 2})  # first-use costs (imports, DeepSpeed set-up, kernels) on both sides
    lane(parts, subjects(1, args.resolution), warm, device), packed(parts, subjects(1, args.resolution), warm, device)
    runs = []
    for n in args.sizes:
        members = subjects(n, args.resolution)
        t_lane, t_pack = lane(parts, members, cfg, device), packed(parts, members, cfg, device)
        runs.append({"subjects": n, "lane_s_per_subject": round(t_lane / n, 3),
                     "packed_s_per_subject": round(t_pack / n, 3),
                     "ratio": round(t_pack / t_lane, 3),
                     "lane_subject_steps_per_s": round(n * cfg.steps / t_lane, 2),
                     "packed_subject_steps_per_s": round(n * cfg.steps / t_pack, 2)})
        print(runs[-1], flush=True)
    record.write(args.out, {"model": args.model, "steps": args.steps, "resolution": args.resolution,
                            "threads": args.threads, "precision": args.precision, "device": str(device),
                            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                            "torch": torch.__version__, "runs": runs}, bulky=())


if __name__ == "__main__":
    main()
