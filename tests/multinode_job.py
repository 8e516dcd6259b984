"""Run by test_batch.py in its own process (one Ray cluster per process): a simulated multi-node Ray
cluster (a head with no CPUs, two 1-CPU worker nodes) runs a job spec."""

import json
import sys

import ray
from ray.cluster_utils import Cluster

from dreambooth_ray import job
from dreambooth_ray.spec import parse_spec

spec = parse_spec(json.loads(sys.argv[1]))
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # head: no training work
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
ray.init(address=cluster.address)
cluster.wait_for_nodes()
results = job.run_job(spec)
print("RESULT " + json.dumps({
    "head": cluster.head_node.node_id,
    "workers": [w.node_id for w in workers],
    "subjects": {r.name: {"status": r.status, "error": r.error} for r in results},
}))
ray.shutdown()
cluster.shutdown()
