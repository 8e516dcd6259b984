"""Wall time and peak memory of the quickstart job, over its whole process tree (driver, Ray, workers).

    .venv/bin/python benchmarks/quickstart_footprint.py

Runs `dreambooth-ray run jobs/quickstart.yaml` into a fresh temporary storage root and samples the
summed RSS of the command and all its descendants every 0.2 s (an upper bound: shared pages count
once per process).
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(p: psutil.Process) -> int:
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
        spec["storage"] = f"{tmp}/store"
        spec["subject"]["images"] = str(ROOT / "jobs" / "quickstart-toy")
        (Path(tmp) / "job.yaml").write_text(yaml.safe_dump(spec))
        cli = Path(sys.executable).with_name("dreambooth-ray")
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(cli), "run", f"{tmp}/job.yaml"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(ps))
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    result = {"exit_code": proc.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 2)}
    print(json.dumps(result))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
