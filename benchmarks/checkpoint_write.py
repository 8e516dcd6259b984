"""The CPU an async checkpoint's file write takes on a local filesystem (#16), in one run, alternating:
- `placed`: what an async checkpoint does now. Its host buffers sit where each tensor's address agrees
  with its data's file position (snapshot._place), so snapshot.DirectFile writes them O_DIRECT straight
  from that memory.
- `direct`: the same tensors where they were allocated, so DirectFile copies them through its own
  buffer (what it did before).
- `buffered`: pyarrow's local output stream (what store_file did before DirectFile).

On a CPU-only machine the writing thread's CPU is taken from the training steps beside it (the
checkpoint_stall benchmark). One state of the given size (fp32 tensors of 108 MB, as a 135M-parameter
UNet's ZeRO-2 shard holds a few large flat ones) is torch.saved through snapshot.stream_to into a
local folder; the writing thread's CPU time (user + system, getrusage) and wall time are recorded;
os.sync between writes keeps one write's writeback out of the next.

    .venv/bin/python benchmarks/checkpoint_write.py [--gb 2.16] [--repeats 5] [--dir /tmp]

Writes benchmarks/results/checkpoint_write.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import record  # noqa: E402 (benchmarks/, beside this file)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="a folder on the filesystem to measure (default: the temp dir's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_write.json"))
    args = ap.parse_args(argv)

    import pyarrow.fs as pafs
    import torch

    from dreambooth_ray import snapshot
    from dreambooth_ray.snapshot import DirectFile, stream_to

    torch.serialization.set_crc32_options(False)  # as checkpoint.save sets it
    n = int(args.gb * 1e9) // 4
    state = {f"flat_{i}": torch.randn(min(27 << 20, n - i * (27 << 20))) for i in range(-(-n // (27 << 20)))}
    placed = {k: torch.empty_like(v) for k, v in state.items()}
    pairs = [(placed[k], v) for k, v in state.items()]
    snapshot._place(placed, True, pairs)  # as SnapshotWriter.save does
    snapshot._fill(pairs)
    assert all(torch.equal(placed[k], v) for k, v in state.items())
    local = pafs.LocalFileSystem()
    # The buffered baseline: the same pyarrow local stream, behind a filesystem DirectFile does not take.
    ways = {"placed": (local, placed), "direct": (local, state),
            "buffered": (pafs.SubTreeFileSystem("/", local), state)}
    runs = {k: [] for k in ways}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if DirectFile.open(local, f"{tmp}/probe") is None:
            raise SystemExit(f"{tmp}: this filesystem refuses O_DIRECT; store_file writes it buffered")
        for rep in range(args.repeats):
            for way, (fs, obj) in ways.items():
                os.sync()
                r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
                stored = stream_to(fs, f"{tmp}/{way}.pt", obj, zipfile=True)
                wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_THREAD)
                runs[way].append({"wall_s": round(wall, 3), "user_s": round(r1.ru_utime - r0.ru_utime, 3),
                                  "system_s": round(r1.ru_stime - r0.ru_stime, 3), "bytes": stored})
                print(way, json.dumps(runs[way][-1]), flush=True)
                os.remove(f"{tmp}/{way}.pt")

    def cpu(way: str) -> float:
        return round(statistics.median(r["user_s"] + r["system_s"] for r in runs[way]), 3)

    result = {"gb": args.gb, "cpus": os.cpu_count(), "runs": runs,
              "cpu_s_median": {w: cpu(w) for w in ways},
              "cpu_ratio_placed_over_direct": round(cpu("placed") / cpu("direct"), 3),
              "cpu_ratio_placed_over_buffered": round(cpu("placed") / cpu("buffered"), 3),
              "cpu_ratio_direct_over_buffered": round(cpu("direct") / cpu("buffered"), 3)}
    return record.write(args.out, result)


if __name__ == "__main__":
    main()
