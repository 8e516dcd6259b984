"""Checkpoint stalls and bytes moved per subject (#16): synchronous against asynchronous uploads, in one run.

A random Stable Diffusion layout whose UNet has ~140M parameters (the tiny VAE and text encoder) trains
one subject through `dreambooth-ray run`'s own path (job.run_job) twice: with `train.checkpoint_upload:
sync` and with `async`, the same steps and checkpoints. Storage is a local folder by default (the upload
is a copy to it); `--s3` uses a local S3 server (moto on loopback), which here takes minutes per GB. The
job's per-subject timeline gives the time training stood still for checkpoints (`checkpoint_stalls`: from
the end of a step to the next step's start, rank 0) and the steps' own time; storage gives the bytes
written. Two ratios, async over sync: the stalls alone, and all the training time a checkpoint costs
(`lost_per_checkpoint_s`: its stall plus how much longer the steps took than the sync run's, which
overlap no write, plus the async run's `checkpoint_buffers`: the host buffers allocated and mapped
after the first step, which only async checkpoints need). Step by step (the loss history's times), the
same within each run: the step after a checkpoint against the run's median other step
(`lost_in_run_*`, the buffers' time counted too), which run-to-run drift does not reach but a write
lasting past that step does not count fully. On a CPU-only machine the background write and the steps
share the cores and the memory bandwidth, so the steps slow; on a GPU the steps run on the device.

A third run, `async_lane`, trains two subjects one after the other in one training lane
(max_concurrent_subjects: 1): the second finds the first one's host buffers (snapshot.release), and
its figures are reported as the lane's cost per later subject.

    .venv/bin/python benchmarks/checkpoint_stall.py [--steps 10] [--every 2] [--channels 128]

Writes benchmarks/results/checkpoint_stall.json.
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
sys.path.insert(0, str(ROOT))

import record  # noqa: E402 (benchmarks/, beside this file)


def big_unet_pipeline(channels: int, seed: int = 0):
    """The tiny pipeline with a UNet of SD1.5's block layout at `channels` base width (SD1.5: 320)."""
    import torch
    from diffusers import UNet2DConditionModel

    from dreambooth_ray import tiny

    pipe = tiny.build_pipeline(seed)
    torch.manual_seed(seed)
    c = channels
    pipe.unet = UNet2DConditionModel(
        sample_size=tiny.TINY_RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(c, 2 * c, 4 * c, 4 * c),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=pipe.text_encoder.config.hidden_size, attention_head_dim=8,
    )
    return pipe


def start_s3() -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("moto server did not start")


def stored_bytes(fs, root: str) -> int:
    return sum(info["size"] for info in fs.find(root, detail=True).values())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=2, help="checkpoint_every")
    ap.add_argument("--channels", type=int, default=128, help="UNet base width (SD1.5: 320)")
    ap.add_argument("--modes", default="sync,async,async_lane", help="the runs (the ratios need all three)")
    ap.add_argument("--s3", action="store_true", help="storage on a local S3 server instead of a folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_stall.json"))
    args = ap.parse_args(argv)

    import boto3
    import ray
    import s3fs

    from dreambooth_ray import job
    from dreambooth_ray.cli import init_ray
    from dreambooth_ray.spec import parse_spec
    from dreambooth_ray.tiny import make_subject_images

    proc = endpoint = None
    if args.s3:
        proc, endpoint = start_s3()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        if args.s3:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            fs, base = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}), "bench"
        init_ray()
        with tempfile.TemporaryDirectory() as tmp:
            if not args.s3:
                import fsspec

                fs, base = fsspec.filesystem("file"), f"{tmp}/storage"
            pipe = big_unet_pipeline(args.channels)
            params = sum(p.numel() for p in pipe.unet.parameters())
            pipe.save_pretrained(f"{tmp}/model")
            make_subject_images(f"{tmp}/photos", n=4)
            runs = {}
            for mode in args.modes.split(","):
                names = ["first", "s"] if mode == "async_lane" else ["s"]
                spec = parse_spec({
                    "name": f"stall-{mode}", "model": f"{tmp}/model",
                    "storage": f"s3://bench/{mode}" if args.s3 else f"{base}/{mode}",
                    **({"s3": {"endpoint_url": endpoint}} if args.s3 else {}),
                    "subjects": [{"name": n, "images": f"{tmp}/photos", "class": "toy"} for n in names],
                    "max_concurrent_subjects": 1,
                    "prior": {"enabled": False},
                    "train": {"resolution": 32, "steps": args.steps, "checkpoint_every": args.every,
                              "checkpoint_upload": mode.split("_")[0], "num_workers": 1, "zero_stage": 2,
                              "mixed_precision": "fp32", "max_failures": 0, "keep_checkpoints": 2},
                    "samples": {"prompts": ["a {identifier} {class_noun}"], "inference_steps": 2},
                })
                os.sync()  # the previous run's files reach the disk now, not during this run's steps
                t0 = time.perf_counter()
                results = job.run_job(spec)
                wall = time.perf_counter() - t0
                assert all(r.status == "done" for r in results), [r.error for r in results]
                r = max(results, key=lambda r: r.train_end)  # async_lane: the lane's second subject
                t = r.timeline
                n_ckpt = args.steps // args.every
                ckpt = stored_bytes(fs, f"{base}/{mode}/checkpoints") // len(names)
                out = stored_bytes(fs, f"{base}/{mode}/outputs") // len(names)
                rows = sorted((row for f in fs.find(f"{base}/{mode}/outputs") if f"/{r.name}/history/" in f
                               for row in json.loads(fs.cat_file(f))["steps"]), key=lambda r: r["step"])
                # Step k's seconds: from step k-1's end to step k's (a checkpoint after step k-1 stalls it).
                step_s = [round(b["time"] - a["time"], 3) for a, b in zip(rows, rows[1:])]
                runs[mode] = {"wall_s": round(wall, 1), "steps_s": t["steps"], "checkpoint_stalls_s": t["checkpoint_stalls"],
                              "checkpoint_buffers_s": t.get("checkpoint_buffers", 0.0), "step_s_from_2": step_s,
                              "stall_per_checkpoint_s": round(t["checkpoint_stalls"] / n_ckpt, 3),
                              "checkpoints": n_ckpt, "bytes_checkpoints_kept": ckpt, "bytes_outputs": out,
                              "timeline": t}
                print(mode, json.dumps(runs[mode]), flush=True)
        ray.shutdown()
    finally:
        if proc is not None:
            proc.terminate()
    if set(runs) != {"sync", "async", "async_lane"}:
        return runs
    sync, asyn = runs["sync"]["stall_per_checkpoint_s"], runs["async"]["stall_per_checkpoint_s"]
    # What a checkpoint costs training in all: its stall plus what its background write took from the
    # steps it overlapped (the sync run's steps overlap nothing: their time is the undisturbed one).
    for r in runs.values():
        r["lost_per_checkpoint_s"] = round((r["steps_s"] + r["checkpoint_stalls_s"] + r["checkpoint_buffers_s"]
                                            - runs["sync"]["steps_s"]) / r["checkpoints"], 3)
        # The same within one run, free of run-to-run drift: the step after a checkpoint (its stall and
        # the write beside it) against the run's median step that follows none.
        # The host buffers are allocated after step 1 (checkpoint_buffers_s, counted once per run).
        after = [d for k, d in enumerate(r["step_s_from_2"], start=2) if (k - 1) % args.every == 0]
        clean = sorted(d for k, d in enumerate(r["step_s_from_2"], start=2) if (k - 1) % args.every)
        r["lost_in_run_each_s"] = [round(d - clean[len(clean) // 2], 3) for d in after]
        r["lost_in_run_per_checkpoint_s"] = round((sum(r["lost_in_run_each_s"]) + r["checkpoint_buffers_s"]) / len(after), 3)
        r["lost_in_run_after_first_s"] = round(sum(r["lost_in_run_each_s"][1:]) / max(len(after) - 1, 1), 3)

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    lost_sync, lost_async = runs["sync"]["lost_per_checkpoint_s"], runs["async"]["lost_per_checkpoint_s"]
    in_sync, in_async = runs["sync"]["lost_in_run_per_checkpoint_s"], runs["async"]["lost_in_run_per_checkpoint_s"]
    lane = runs["async_lane"]
    result = {
        "unet_parameters": params, "steps": args.steps, "checkpoint_every": args.every, "storage": "moto S3 on loopback" if args.s3 else "local folder",
        "cpus": os.cpu_count(), "runs": runs,
        "stall_ratio_async_over_sync": ratio(asyn, sync),
        "lost_ratio_async_over_sync": ratio(lost_async, lost_sync),
        "lost_in_run_ratio_async_over_sync": ratio(in_async, in_sync),
        # None with one checkpoint in the run's steps (the last step's is never followed by one).
        "lost_in_run_after_first_ratio_async_over_sync": ratio(runs["async"]["lost_in_run_after_first_s"],
                                                               runs["sync"]["lost_in_run_after_first_s"]),
        "lane_later_subject_lost_ratio_async_over_sync": ratio(lane["lost_per_checkpoint_s"], lost_sync),
        "lane_later_subject_lost_in_run_ratio_async_over_sync": ratio(lane["lost_in_run_per_checkpoint_s"], in_sync),
        "checkpoint_bytes_each": runs["sync"]["bytes_checkpoints_kept"] // min(2, runs["sync"]["checkpoints"]),
    }
    return record.write(args.out, result)


if __name__ == "__main__":
    main()
