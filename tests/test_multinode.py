"""Runs land on different nodes of a multi-node cluster (simulated with ray.cluster_utils.Cluster)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_spec


def test_runs_are_placed_on_different_nodes(tmp_path, toy_images):
    spec = tiny_spec(str(tmp_path / "store"), str(toy_images), prior={"enabled": False},
                     train={"steps": 1, "checkpoint_every": 1, "method": "lora"}, samples={"prompts": ["a {class_noun}"]})
    spec["subjects"].append({"name": "toy2", "images": str(toy_images), "class": "toy", "identifier": "zwx"})
    # Its own process: one Ray cluster per process, and this session already has one.
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_job.py")), json.dumps(spec)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    assert {n: s["status"] for n, s in out["subjects"].items()} == {"toy": "done", "toy2": "done"}, out
    nodes = {}
    for name in ("toy", "toy2"):
        rec = json.loads((tmp_path / "store" / "outputs" / "t" / name / "job.json").read_text())
        nodes[name] = rec["metrics"]["node_id"]
        assert rec["model"] == rec["lora"] and rec["lora"].endswith(f"/{name}/lora") and rec["lora_bytes"] > 0
    assert nodes["toy"] != nodes["toy2"], "the two runs should have been placed on the two worker nodes"
    assert set(nodes.values()) == set(out["workers"]) and out["head"] not in nodes.values()
