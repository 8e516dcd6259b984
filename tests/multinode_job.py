"""Run by test_batch.py in its own process (one Ray cluster per process): a simulated multi-node Ray
cluster (a head with no CPUs and no dashboard, two 1-CPU worker nodes) runs a job spec."""

import json
import socket
import sys
import time

import ray
from ray.cluster_utils import Cluster

from dreambooth_ray import console, job
from dreambooth_ray.spec import parse_spec

spec = parse_spec(json.loads(sys.argv[1]))
# The head: no training work, and no dashboard: its port is taken (as by another Ray instance on the
# machine), so it fails to start and the cluster runs without one.
taken = socket.create_server(("127.0.0.1", 0))
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "dashboard_port": taken.getsockname()[1]})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
ray.init(address=cluster.address)
cluster.wait_for_nodes()
results = job.run_job(spec)
t = time.perf_counter()
logs = console.log_files()  # what run_job asks before and after: this cluster has no dashboard to answer
asked_s = time.perf_counter() - t
print("RESULT " + json.dumps({
    "head": cluster.head_node.node_id,
    "workers": [w.node_id for w in workers],
    "subjects": {r.name: {"status": r.status, "error": r.error} for r in results},
    "dashboard": console._dashboard_address(), "logs": logs, "logs_asked_s": asked_s,
}))
ray.shutdown()
cluster.shutdown()
