"""What the Ray cluster has now, what it can scale to, and asking its autoscaler for a job's nodes.

An autoscaling cluster (the shipped RayJob/RayCluster, the cluster-launcher configs) may start with
no worker nodes at all: deciding GPU or CPU, and how many subjects train at once, from what is
there when the job starts would train on CPUs, one subject at a time. So a job decides from what
the cluster can scale to, first found wins:

1. the cluster config an autoscaler reports to the GCS (`ray._private.state`; what Ray Train and
   Ray Data read; Ray's open-source autoscalers don't report it in 2.60);
2. the `--autoscaling-config` file of this cluster's autoscaler: the monitor process whose
   `--gcs-address` is this cluster's, on the driver's machine (cluster-launcher clusters, where
   jobs run on the head, and `ray.cluster_utils.AutoscalingCluster`);
3. environment variables on the driver, which the cluster configs set on the head (KubeRay runs
   its autoscaler in another container, out of reach):
   DREAMBOOTH_RAY_USE_GPU=1 (or 0): train on GPUs (or CPUs) when the spec doesn't say;
   DREAMBOOTH_RAY_MAX_GPUS=N, DREAMBOOTH_RAY_MAX_CPUS=N: the most the cluster can scale to;
   DREAMBOOTH_RAY_GPU_MEMORY_GB=G: the memory of its GPUs (the preflight's memory plan checks it).

What 2. or 3. finds is kept in the cluster's KV store, so that tasks on other nodes (a class's
prior task) count the same.

Otherwise only what the cluster has now counts (and `train.use_gpu`, `max_concurrent_subjects`,
`num_actors` in the spec).
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import ray

ENV_USE_GPU = "DREAMBOOTH_RAY_USE_GPU"
ENV_MAX = "DREAMBOOTH_RAY_MAX_{}S"  # DREAMBOOTH_RAY_MAX_GPUS, DREAMBOOTH_RAY_MAX_CPUS, ...
ENV_GPU_MEMORY = "DREAMBOOTH_RAY_GPU_MEMORY_GB"
# GB of memory of the accelerator types Ray names unambiguously ("accelerator_type:<name>" node
# resources); an A100 or V100 comes in two sizes, so a plain "A100" says nothing.
GPU_MEMORY_GB = {"H100": 80, "H200": 141, "B200": 180, "A100-40G": 40, "A100-80G": 80, "L40S": 48, "L40": 48,
                 "L4": 24, "A10G": 24, "A10": 24, "T4": 16}
HEAD_RESOURCE = "node:__internal_head__"
KV_KEY = "dreambooth_ray:autoscaler_limits"


# ---- the arithmetic (no Ray needed) --------------------------------------------------------------

def worker_limits(config: dict) -> dict[str, float]:
    """The most of each resource an autoscaling config's worker nodes can add: per node type,
    max_workers x that type's resources, with the cluster-wide `max_workers` (a cap on the node
    count) spent on the types richest in that resource first. Defaults as Ray's `prepare_config`
    fills them: a worker type's max_workers is the cluster's, the head type's is 0. A type whose
    resources are left to detection (`resources: {}`) adds nothing that can be counted on."""
    types = config.get("available_node_types") or {}
    cap = config.get("max_workers")
    nodes = []  # (max nodes, resources per node)
    for name, t in types.items():
        n = t.get("max_workers", 0 if name == config.get("head_node_type") else cap)
        if n and t.get("resources"):
            nodes.append((int(n), t["resources"]))
    out: dict[str, float] = {}
    for key in {k for _, res in nodes for k in res}:
        left = cap if cap is not None else sum(n for n, _ in nodes)
        total = 0.0
        for n, res in sorted(nodes, key=lambda x: -float(x[1].get(key, 0))):
            take = min(n, left)
            total += take * float(res.get(key, 0))
            left -= take
        out[key] = total
    return out


def reach(now: dict, head: dict, limits: dict | None) -> dict[str, float]:
    """What the cluster can have at most: the head's resources plus what the workers can add, and
    never less than it has now."""
    out = dict(now)
    for key, v in (limits or {}).items():
        out[key] = max(out.get(key, 0), head.get(key, 0) + v)
    return out


def monitor_config_path(gcs_address: str, cmdlines) -> str | None:
    """The `--autoscaling-config` of the autoscaler (monitor.py) serving `gcs_address`, among
    process command lines: the one given that address, else one given another name for it (the
    same port: one machine has one GCS on a port)."""
    port = gcs_address.rsplit(":", 1)[-1]
    found = {}
    for cmd in cmdlines:
        if not cmd or not any(Path(a).name == "monitor.py" for a in cmd[:4]):
            continue
        args = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        addr, path = args.get("gcs-address", ""), args.get("autoscaling-config")
        if path and addr == gcs_address:
            return os.path.expanduser(path)
        if path and addr.rsplit(":", 1)[-1] == port:
            found.setdefault("port", os.path.expanduser(path))
    return found.get("port")


def _flag(value: str | None) -> bool | None:
    if value is None or not value.strip():
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


# ---- reading the cluster -------------------------------------------------------------------------

def _gcs_address() -> str:
    return ray.get_runtime_context().gcs_address


def _monitor_cmdlines():
    import psutil

    # The running autoscaler's pid is in its status record; else look at every process.
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if status:
            yield psutil.Process(json.loads(status)["monitor_pid"]).cmdline()
    except Exception:
        pass
    for p in psutil.process_iter(["cmdline"]):
        yield p.info.get("cmdline")


def autoscaler_config() -> dict | None:
    """This cluster's autoscaling config, when its autoscaler runs where the driver can see it."""
    import yaml

    try:
        path = monitor_config_path(_gcs_address(), _monitor_cmdlines())
        return yaml.safe_load(Path(path).read_text()) if path else None
    except Exception:
        return None


def _env_limits() -> dict[str, float] | None:
    out = {}
    for key in ("GPU", "CPU"):
        v = os.environ.get(ENV_MAX.format(key))
        if v and v.strip():
            out[key] = float(v)
    return out or None


def max_resources() -> dict[str, float] | None:
    """The most of each resource this cluster can scale to, or None when nothing says (then a
    job can only count on what is there now)."""
    try:
        gcs = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:
        gcs = None
    if gcs:
        return reach(ray.cluster_resources(), {}, gcs)
    found = None
    config = autoscaler_config()
    if config is not None:
        head = {}
        for n in ray.nodes():
            if n.get("Alive") and HEAD_RESOURCE in n.get("Resources", {}):
                head = n["Resources"]
        found = {"head": head, "limits": worker_limits(config)}
    elif _env_limits():
        found = {"head": {}, "limits": _env_limits()}
    try:  # kept in the cluster's KV store for tasks on other nodes, where neither can be read
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

        if found:
            _internal_kv_put(KV_KEY, json.dumps(found), overwrite=True)
        else:
            seen = _internal_kv_get(KV_KEY)
            found = json.loads(seen) if seen else None
    except Exception:
        pass
    return reach(ray.cluster_resources(), found["head"], found["limits"]) if found else None


def capacity_of(resource: str) -> int:
    """How much of `resource` ("GPU", "CPU") the cluster has or can scale to: the larger of what it
    has now and what its autoscaler can reach."""
    now = ray.cluster_resources().get(resource, 0)
    return int(max(now, (max_resources() or {}).get(resource, 0)))


def driver_node_cpus() -> float:
    """The CPUs Ray offers on the node this driver runs on (0 on a head that does no work)."""
    me = ray.get_runtime_context().get_node_id()
    return next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["NodeID"] == me), 0)


def use_gpu(spec) -> bool:
    """`train.use_gpu` when the spec sets it, else DREAMBOOTH_RAY_USE_GPU when set, else whether the
    cluster has GPUs now or its autoscaler can add some."""
    if spec.train.use_gpu is not None:
        return spec.train.use_gpu
    env = _flag(os.environ.get(ENV_USE_GPU))
    if env is not None:
        return env
    return capacity_of("GPU") > 0


def gpu_memory() -> int | None:
    """Bytes of memory of the cluster's GPUs (the smallest, when they differ), for the memory plan:
    DREAMBOOTH_RAY_GPU_MEMORY_GB when set, else the accelerator types of the GPU nodes alive now
    (an autoscaling cluster may have none yet); None when nothing says."""
    env = os.environ.get(ENV_GPU_MEMORY)
    if env:
        return int(float(env) * (1 << 30))
    sizes = [GPU_MEMORY_GB.get(k.split(":", 1)[1]) for n in ray.nodes() if n.get("Alive")
             for k in n.get("Resources", {}) if k.startswith("accelerator_type:")]
    if not sizes or None in sizes:
        return None
    return min(sizes) * (1 << 30)


# ---- asking the autoscaler -----------------------------------------------------------------------

_requested = False


def request_workers(use_gpu: bool, n: int) -> bool:
    """Ask the autoscaler for `n` training workers' resources at once (1 GPU, or 1 CPU, each: what a
    Ray Train worker takes), past its upscaling speed, instead of node by node as trainers wait.
    Nothing is asked when the cluster already has them. The request lasts until `release()` (also
    called at exit); a request is cluster-wide, so a later job's request replaces this one.
    Returns whether a request was made."""
    global _requested
    key = "GPU" if use_gpu else "CPU"
    if n <= 0 or ray.cluster_resources().get(key, 0) >= n:
        return False
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{key: 1}] * n)
    if not _requested:
        atexit.register(release)
    _requested = True
    return True


def release() -> None:
    """Withdraw this process's request, so idle nodes can scale down."""
    global _requested
    if not _requested or not ray.is_initialized():
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
    finally:
        _requested = False
