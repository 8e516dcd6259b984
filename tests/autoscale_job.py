"""Run by test_autoscale.py in its own process (one Ray cluster per process): Ray's autoscaling test
cluster (the fake node provider: nodes are processes on this machine, started and stopped by the
real autoscaler) with a head that has no CPUs for work and 1-CPU worker nodes that start at 0, runs
a job spec. Prints what the job saw at its start and which nodes it ended up with."""

import json
import os
import socket
import sys
import tempfile

os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")  # read by the autoscaler's process

import psutil  # noqa: E402
import ray  # noqa: E402
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import AutoscalingCluster, Cluster  # noqa: E402


class SharedMachineAutoscalingCluster(AutoscalingCluster):
    """`ray.cluster_utils.AutoscalingCluster`, with three changes for a machine that other tests
    share: its start and shutdown run `ray stop --force` (which stops every Ray on the machine) and
    `ray start --head` on the fixed port 6379 that the fake provider's nodes also assume, so this
    starts the head as a `Cluster` (free ports, its own processes) with the autoscaler pointed at
    it; and the pip wheel lacks the fake provider's example.yaml that its config starts from, so
    that base is here."""

    BASE = {
        "cluster_name": "fake_multinode", "max_workers": 8,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "available_node_types": {}, "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1, "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = json.loads(json.dumps(self.BASE))
        config["available_node_types"] = dict(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {"resources": head_resources, "node_config": {},
                                                              "max_workers": 0}
        config.update(config_kwargs)
        return config

    def start(self):
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        ip = ray._private.services.get_node_ip_address()
        self._config["provider"]["gcs_address"] = f"{ip}:{port}"  # where the fake nodes join
        fd, self._path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self._config, f)
        self.cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=self._head_resources.get("CPU", 0), gcs_server_port=port, autoscaling_config=self._path,
            include_dashboard=False))
        assert self.cluster.address == self._config["provider"]["gcs_address"], self.cluster.address

    def shutdown(self):
        # The autoscaler's nodes are its child processes (and theirs): stopped with it, by pid.
        [monitor] = self.cluster.head_node.all_processes[ray_constants.PROCESS_TYPE_MONITOR]
        nodes = psutil.Process(monitor.process.pid).children(recursive=True)
        for p in nodes:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.cluster.shutdown()
        # After the head: until their parents go, the killed nodes are zombies that a wait sees running.
        psutil.wait_procs(nodes, timeout=10)
        os.unlink(self._path)


ac = SharedMachineAutoscalingCluster(
    head_resources={"CPU": 0},  # the head does no work
    worker_node_types={"cpu": {"resources": {"CPU": 1, "object_store_memory": 150 * 1024 * 1024},
                               "node_config": {}, "min_workers": 0, "max_workers": 2}},
)
ac.start()  # first: its processes start up while this one imports torch and the rest
try:
    from dreambooth_ray import cluster, job
    from dreambooth_ray.spec import parse_spec

    spec = parse_spec(json.loads(sys.argv[1]))
    ray.init(address=ac.cluster.address)
    head = ray.get_runtime_context().get_node_id()
    at_start = {"nodes": len([n for n in ray.nodes() if n["Alive"]]), "CPU": ray.cluster_resources().get("CPU", 0),
                "capacity_of_CPU": cluster.capacity_of("CPU"), "use_gpu": cluster.use_gpu(spec),
                "window": job.capacity(spec, cluster.use_gpu(spec))}
    results = job.run_job(spec)
    workers = [n["NodeID"] for n in ray.nodes() if n["NodeID"] != head]
    print("RESULT " + json.dumps({
        "at_start": at_start, "head": head, "workers": workers,
        "subjects": {r.name: {"status": r.status, "error": r.error} for r in results},
    }), flush=True)
    ray.shutdown()
finally:
    ac.shutdown()
