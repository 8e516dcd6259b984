"""Autoscaling clusters: a job decides GPU or CPU and how many subjects train at once from what the
cluster can scale to, not from the nodes up when it starts, and asks the autoscaler for them."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dreambooth_ray import cluster
from dreambooth_ray.tiny import make_subject_images

from conftest import ROOT, tiny_spec

# ---- the arithmetic, no Ray -------------------------------------------------------------------------

AWS_LIKE = {
    "max_workers": 8, "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 0, "GPU": 0}},  # no max_workers: the head type's default is 0
        "gpu_spot": {"max_workers": 8, "resources": {"CPU": 8, "GPU": 1}},
        "gpu_ondemand": {"max_workers": 2, "resources": {"CPU": 8, "GPU": 1}},
        "big": {"max_workers": 1, "resources": {"CPU": 32, "GPU": 4}},
        "detected": {"max_workers": 4, "resources": {}},  # resources unknown until launched: not counted
    },
}


def test_worker_limits_count_max_workers_times_resources_within_the_cluster_cap():
    # 8 nodes in all: the 4-GPU node first, then 7 one-GPU nodes; CPUs likewise (32 + 7 x 8).
    assert cluster.worker_limits(AWS_LIKE) == {"CPU": 32 + 7 * 8, "GPU": 4 + 7}
    uncapped = {**AWS_LIKE, "max_workers": 100}
    assert cluster.worker_limits(uncapped) == {"CPU": 32 + 10 * 8, "GPU": 4 + 10}
    # A worker type without max_workers takes the cluster's; without any node types, nothing.
    one = {"max_workers": 3, "head_node_type": "h", "available_node_types": {"w": {"resources": {"GPU": 2}}}}
    assert cluster.worker_limits(one) == {"GPU": 6}
    assert cluster.worker_limits({"max_workers": 2}) == {}


def test_reach_is_the_head_plus_what_workers_add_and_never_less_than_now():
    assert cluster.reach({"CPU": 0}, {"CPU": 0}, {"CPU": 2}) == {"CPU": 2}
    assert cluster.reach({"CPU": 5, "GPU": 1}, {"CPU": 4}, {"CPU": 2, "GPU": 8}) == {"CPU": 6, "GPU": 8}
    assert cluster.reach({"CPU": 9}, {"CPU": 4}, {"CPU": 2}) == {"CPU": 9}  # e.g. nodes added by hand
    assert cluster.reach({"CPU": 3}, {}, None) == {"CPU": 3}


def test_the_autoscaler_config_is_the_one_of_this_clusters_monitor():
    mon = "/venv/lib/python3.11/site-packages/ray/autoscaler/_private/monitor.py"
    procs = [
        None,
        ["python", "-u", "/x/ray/_private/log_monitor.py", "--gcs-address=10.0.0.1:6379"],  # not an autoscaler
        ["python", "-u", mon, "--gcs-address=10.0.0.1:7000", "--autoscaling-config=/other.yaml"],
        ["python", "-u", mon, "--logs-dir=/tmp", "--gcs-address=10.0.0.1:6379",
         "--autoscaling-config=~/ray_bootstrap_config.yaml"],
    ]
    assert cluster.monitor_config_path("10.0.0.1:6379", procs) == os.path.expanduser("~/ray_bootstrap_config.yaml")
    assert cluster.monitor_config_path("127.0.0.1:6379", procs) == os.path.expanduser("~/ray_bootstrap_config.yaml")
    assert cluster.monitor_config_path("10.0.0.1:7001", procs) is None
    no_config = [["python", "-u", mon, "--gcs-address=10.0.0.1:6379"]]  # a monitor that doesn't autoscale
    assert cluster.monitor_config_path("10.0.0.1:6379", no_config) is None


def _spec(use_gpu=None):
    return SimpleNamespace(train=SimpleNamespace(use_gpu=use_gpu))


@pytest.mark.parametrize("spec_says, env, can_reach, expected", [
    (True, None, 0, True),      # the spec decides (the k8s renderer writes use_gpu: true)
    (False, "1", 8, False),
    (None, "1", 0, True),       # the cluster config says so on the head
    (None, "0", 8, False),
    (None, None, 8, True),      # no GPU now, but the autoscaler can add 8
    (None, None, 0, False),
])
def test_use_gpu(monkeypatch, spec_says, env, can_reach, expected):
    monkeypatch.setattr(cluster, "capacity_of", lambda r: can_reach if r == "GPU" else 4)
    if env is None:
        monkeypatch.delenv(cluster.ENV_USE_GPU, raising=False)
    else:
        monkeypatch.setenv(cluster.ENV_USE_GPU, env)
    assert cluster.use_gpu(_spec(spec_says)) is expected


@pytest.mark.parametrize("use_gpu, can_reach, driver_cpus, workers, cap, expected", [
    (False, 2, 2, 1, None, 1),   # one 2-CPU machine: a CPU stays for the job's own work
    (False, 4, 4, 2, None, 1),
    (False, 5, 5, 2, None, 2),
    (False, 16, 8, 8, None, 2),  # two 8-CPU nodes, the driver on one: all 16 count
    (False, 2, 0, 1, None, 2),   # a head with no CPUs (k8s, cluster/*.yaml)
    (False, 1, 1, 1, None, 1),   # no room once one is kept: still one lane
    (False, 0, 0, 1, 3, 3),      # nothing known: max_concurrent_subjects
    (True, 4, 4, 1, None, 4),    # GPUs: all of them
    (False, 5, 5, 2, 1, 1),      # max_concurrent_subjects caps
])
def test_concurrent_subjects(monkeypatch, use_gpu, can_reach, driver_cpus, workers, cap, expected):
    from dreambooth_ray import job

    monkeypatch.setattr(cluster, "capacity_of", lambda r: can_reach)
    monkeypatch.setattr(cluster, "driver_node_cpus", lambda: driver_cpus)
    spec = SimpleNamespace(train=SimpleNamespace(num_workers=workers), max_concurrent_subjects=cap)
    assert job.capacity(spec, use_gpu) == expected


def test_env_limits(monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_RAY_MAX_GPUS", "8")
    monkeypatch.delenv("DREAMBOOTH_RAY_MAX_CPUS", raising=False)
    assert cluster._env_limits() == {"GPU": 8.0}
    monkeypatch.setenv("DREAMBOOTH_RAY_MAX_GPUS", "")
    assert cluster._env_limits() is None


# ---- on Ray's autoscaling test cluster ------------------------------------------------------------

def test_job_on_an_autoscaling_cluster_scales_up_and_trains_subjects_concurrently(tmp_path):
    """The head has no CPUs for work and the 1-CPU workers start at 0 (max 2): at job start the
    cluster has nothing to train on, yet the job plans 2 subjects at once, the autoscaler adds 2
    nodes, and the two runs overlap, one on each new node."""
    photos, store = tmp_path / "photos", tmp_path / "store"
    make_subject_images(photos / "a", n=3, seed=1)
    make_subject_images(photos / "c", n=3, seed=3, color=(30, 30, 220))
    data = tiny_spec(str(store), "unused", train={"steps": 2, "checkpoint_every": 2}, prior={"enabled": False},
                     samples={"prompts": ["a {identifier} {class_noun}"], "inference_steps": 1})
    data["subjects"] = [{"name": "a", "images": str(photos / "a"), "class": "toy"},
                        {"name": "c", "images": str(photos / "c"), "class": "cup"}]
    env = {**os.environ, "RAY_ADDRESS": "", "DREAMBOOTH_RAY_CACHE": str(tmp_path / "cache"),
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # fake nodes are never drained
    for k in (cluster.ENV_USE_GPU, "DREAMBOOTH_RAY_MAX_GPUS", "DREAMBOOTH_RAY_MAX_CPUS"):
        env.pop(k, None)  # what the job knows comes from the autoscaler
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("autoscale_job.py")), json.dumps(data)],
                       capture_output=True, text=True, timeout=600, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(line[0][len("RESULT "):])
    # At the start: the head alone, no CPU to train on; the autoscaler can add 2.
    assert out["at_start"] == {"nodes": 1, "CPU": 0, "capacity_of_CPU": 2, "use_gpu": False, "window": 2}, out
    assert {n: s["status"] for n, s in out["subjects"].items()} == {"a": "done", "c": "done"}, out

    summary = json.loads((store / "outputs" / "t" / "results.json").read_text())
    spans = sorted((s["train_start"], s["train_end"]) for s in summary["subjects"])
    assert spans[1][0] < spans[0][1], f"the two runs did not overlap: {spans}"
    nodes = {n: json.loads((store / "outputs" / "t" / n / "job.json").read_text())["metrics"]["node_id"]
             for n in ("a", "c")}
    assert nodes["a"] != nodes["c"] and out["head"] not in nodes.values(), (nodes, out)
    assert set(nodes.values()) <= set(out["workers"]) and len(out["workers"]) == 2, (nodes, out)
