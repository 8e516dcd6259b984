"""KubeRay manifests for a job spec: `dreambooth-ray k8s render JOB.yaml` prints a ready RayJob.

One function builds each object, so GPU type, node count and image are options, not hand edits
(this replaces kustomize overlays). The files in k8s/ are this module's output for the example
specs; a test keeps them in sync. Nothing here carries credentials: pods read object-storage
credentials from a Secret (optional) or from workload identity on the ServiceAccount.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .spec import JobSpec

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "ghcr.io/dreambooth-ray/dreambooth-ray:0.1.0"  # built from the Dockerfile in this repo
SPEC_MOUNT = "/etc/dreambooth"
LABELS = {"app.kubernetes.io/name": "dreambooth-ray", "app.kubernetes.io/part-of": "dreambooth-ray"}
# KubeRay's MaxRayJobNameLength: it names the RayCluster `<rayjob>-<5 chars>` and caps those at 53.
MAX_NAME = 47
# The operator's pods carry this label in both the Helm chart (componentOverride) and the kustomize
# install, which disagree on app.kubernetes.io/name.
OPERATOR_LABELS = {"app.kubernetes.io/component": "kuberay-operator"}


@dataclass
class K8sOptions:
    image: str = DEFAULT_IMAGE
    namespace: str = "dreambooth"
    gpu_type: str | None = None  # value of the node label `nvidia.com/gpu.product`, e.g. NVIDIA-A100-SXM4-80GB
    gpus_per_worker: int = 1
    max_workers: int = 4  # GPU worker pods; the autoscaler starts from 0
    worker_cpu: str = "8"
    worker_memory: str = "48Gi"
    shm_size: str = "16Gi"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    s3_secret: str = "dreambooth-s3"  # keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY; optional
    service_account: str = "dreambooth-ray"
    ttl_seconds: int = 3600
    idle_timeout_seconds: int = 120
    extra_tolerations: list[dict] = field(default_factory=list)
    # Where the KubeRay operator runs: it polls the head's dashboard to follow the RayJob. Its Helm
    # chart installs into the release's namespace: `default` with KubeRay's documented `helm install`.
    operator_namespace: str = "default"


class K8sError(UserError, ValueError):
    """A manifest that cannot be rendered from this spec."""


def _security():
    pod = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _pod(o: K8sOptions, name: str, resources: dict, gpu: bool, extra_mounts=(), extra_volumes=(), env=()) -> dict:
    pod_sec, ctr_sec = _security()
    container = {
        **({"env": list(env)} if env else {}),
        "name": name,
        "image": o.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": resources,
        "securityContext": ctr_sec,
        # Optional: without the Secret, credentials come from workload identity (IRSA / GKE WI).
        "envFrom": [{"secretRef": {"name": o.s3_secret, "optional": True}}],
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *extra_mounts],
    }
    spec = {
        "serviceAccountName": o.service_account,
        "securityContext": pod_sec,
        "containers": [container],
        # NCCL and PyTorch data loading need a large /dev/shm; the default 64 MiB is not enough.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": o.shm_size}}, *extra_volumes],
    }
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                               *o.extra_tolerations]
        if o.gpu_type:
            spec["nodeSelector"] = {"nvidia.com/gpu.product": o.gpu_type}
    return {"metadata": {"labels": dict(LABELS)}, "spec": spec}


def cluster_spec(o: K8sOptions, spec_configmap: str | None = None) -> dict:
    head_mounts, head_volumes = [], []
    if spec_configmap:
        head_mounts = [{"name": "job-spec", "mountPath": SPEC_MOUNT, "readOnly": True}]
        head_volumes = [{"name": "job-spec", "configMap": {"name": spec_configmap}}]
    head_res = {"requests": {"cpu": o.head_cpu, "memory": o.head_memory},
                "limits": {"cpu": o.head_cpu, "memory": o.head_memory}}
    gpu = str(o.gpus_per_worker)
    worker_res = {"requests": {"cpu": o.worker_cpu, "memory": o.worker_memory, "nvidia.com/gpu": gpu},
                  "limits": {"cpu": o.worker_cpu, "memory": o.worker_memory, "nvidia.com/gpu": gpu}}
    _, ctr_sec = _security()
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "authOptions": {"mode": "token"},
        "autoscalerOptions": {"idleTimeoutSeconds": o.idle_timeout_seconds, "upscalingMode": "Default",
                              "securityContext": ctr_sec},
        "headGroupSpec": {
            # The head coordinates only: no CPUs or GPUs for tasks, so training never lands there.
            "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
            "serviceType": "ClusterIP",  # dashboard and job API reachable inside the cluster only
            # KubeRay's autoscaler runs in its own container, where the driver cannot read its limits:
            # the head says what the GPU group can scale to (see cluster.py), so subjects run concurrently.
            "template": _pod(o, "ray-head", head_res, gpu=False, extra_mounts=head_mounts, extra_volumes=head_volumes,
                             env=[{"name": "DREAMBOOTH_RAY_USE_GPU", "value": "1"},
                                  {"name": "DREAMBOOTH_RAY_MAX_GPUS", "value": str(o.max_workers * o.gpus_per_worker)}]),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": o.max_workers,
            "rayStartParams": {},
            "template": _pod(o, "ray-worker", worker_res, gpu=True),
        }],
    }


def k8s_name(raw: str, limit: int = MAX_NAME) -> str:
    """`raw` as a DNS-1035 label (what KubeRay requires of RayJob and RayCluster names): lowercase
    letters, digits and '-', starting with a letter, ending with a letter or digit, at most `limit`.
    A name that had to change gets 8 hex digits of a hash of `raw`, so two job names that differ
    only past the cut, or in case or punctuation, still get two objects instead of one overwriting
    the other."""
    name = re.sub(r"[^a-z0-9-]", "-", raw.lower()).strip("-")
    if not name[:1].isalpha():
        name = f"x-{name}".rstrip("-")
    if name == raw and len(name) <= limit:
        return name
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{name[:limit - len(digest) - 1].rstrip('-')}-{digest}"


def _meta(name: str, o: K8sOptions) -> dict:
    return {"name": name, "namespace": o.namespace, "labels": dict(LABELS)}


def support_objects(o: K8sOptions, cluster_label: str) -> list[dict]:
    """The ServiceAccount pods run as, and a NetworkPolicy keeping the dashboard namespace-internal
    (plus the KubeRay operator)."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(o.service_account, o)},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": _meta(f"{cluster_label}-dashboard", o),
         "spec": {
             "podSelector": {"matchLabels": {"ray.io/node-type": "head", **LABELS}},
             "policyTypes": ["Ingress"],
             "ingress": [
                 # Dashboard / job API (8265): pods in this namespace (the RayJob's submitter), and
                 # the KubeRay operator, which polls the job's status there from its own namespace.
                 {"from": [{"podSelector": {}},
                           {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": o.operator_namespace}},
                            "podSelector": {"matchLabels": OPERATOR_LABELS}}],
                  "ports": [{"protocol": "TCP", "port": 8265}]},
                 # GCS, client and object-manager traffic from this namespace's Ray pods.
                 {"from": [{"podSelector": {"matchLabels": LABELS}}]},
             ],
         }},
    ]


def local_paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, path) for each place in `spec` on this machine's disk, which a remote cluster's pods
    cannot read. Built-in models ('tiny', ...) and hub ids are fine: any machine makes or downloads
    them. Shared by `k8s render` and `submit`."""
    from .storage import is_remote
    from .tiny import BUILT_IN

    def local_model(ref: str) -> bool:
        # A hub id never starts with '/', '.' or '~'; a folder that exists here is a folder.
        return ref not in BUILT_IN and not is_remote(ref) and (ref.startswith(("/", ".", "~")) or Path(ref).exists())

    found = [("storage", spec.storage)] + [(f"subjects.{s.name}.images", s.images) for s in spec.subjects]
    found = [(f, p) for f, p in found if not is_remote(p)]
    models = [("model", spec.model)] + ([("sr.model", spec.sr.model)] if spec.sr.enabled else [])
    return found + [(f, m) for f, m in models if local_model(m)]


def _check_cloud_paths(spec: JobSpec) -> None:
    local = local_paths(spec)
    if local:
        fields = ", ".join(f"{f} ({p})" for f, p in local)
        raise K8sError(f"{fields}: pods on Kubernetes don't share this machine's disk; use s3:// URLs")


def render_rayjob(spec: JobSpec, o: K8sOptions) -> list[dict]:
    """ConfigMap (the validated spec) + RayJob (+ ServiceAccount, NetworkPolicy)."""
    _check_cloud_paths(spec)
    name = k8s_name(f"dreambooth-{spec.name}")
    if spec.train.use_gpu is None:
        # "Use GPUs if the cluster has any" is decided when the job starts, and the cluster starts
        # with no GPU workers (the autoscaler adds them on demand): the job would train on CPUs.
        spec = spec.model_copy(update={"train": spec.train.model_copy(update={"use_gpu": True})})
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{name}-spec", o),
        "data": {"job.yaml": yaml.safe_dump(json.loads(spec.model_dump_json(by_alias=True)), sort_keys=False)},
    }
    rayjob = {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(name, o),
        "spec": {
            "entrypoint": f"dreambooth-ray run {SPEC_MOUNT}/job.yaml --address auto",
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": o.ttl_seconds,
            "backoffLimit": 0,  # a re-run resumes from checkpoints: resubmit rather than retry blindly
            "submitterPodTemplate": {"spec": {
                "restartPolicy": "Never",
                "serviceAccountName": o.service_account,
                "securityContext": _security()[0],
                # No command: KubeRay supplies `ray job submit ... -- <entrypoint>`.
                "containers": [{"name": "submitter", "image": o.image, "securityContext": _security()[1],
                                "resources": {"requests": {"cpu": "200m", "memory": "512Mi"},
                                              "limits": {"cpu": "1", "memory": "1Gi"}}}],
            }},
            "rayClusterSpec": cluster_spec(o, spec_configmap=f"{name}-spec"),
        },
    }
    return [configmap, rayjob, *support_objects(o, name)]


def render_raycluster(o: K8sOptions, name: str = "dreambooth-ray") -> list[dict]:
    """A long-lived RayCluster for `dreambooth-ray submit` (specs arrive with each submission)."""
    name = k8s_name(name)
    rc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(name, o), "spec": cluster_spec(o)}
    return [rc, *support_objects(o, name)]


class _Dumper(yaml.SafeDumper):
    pass


# Multi-line strings (the spec inside the ConfigMap) as literal blocks, readable in `kubectl get -o yaml`.
_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump(docs: list[dict]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False) for d in docs)


def add_commands(sub) -> None:
    k8s = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests").add_subparsers(dest="k8s_command", required=True)
    for what in ("render", "cluster"):
        p = k8s.add_parser(what, help="print a RayJob for a job spec" if what == "render"
                           else "print a long-lived RayCluster for `dreambooth-ray submit`")
        if what == "render":
            p.add_argument("job")
        p.add_argument("--image", default=DEFAULT_IMAGE)
        p.add_argument("--namespace", default="dreambooth")
        p.add_argument("--gpu-type", default=None, help="node label nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3")
        p.add_argument("--gpus-per-worker", type=int, default=1)
        p.add_argument("--max-workers", type=int, default=4, help="most GPU worker pods (autoscaled from 0)")
        p.add_argument("--s3-secret", default="dreambooth-s3")
        p.add_argument("--service-account", default="dreambooth-ray")
        p.add_argument("--operator-namespace", default=K8sOptions.operator_namespace,
                       help="namespace of the KubeRay operator, admitted to the dashboard port (default: %(default)s)")
        p.set_defaults(fn=_cmd)


def _cmd(args, console) -> int:
    o = K8sOptions(image=args.image, namespace=args.namespace, gpu_type=args.gpu_type,
                   gpus_per_worker=args.gpus_per_worker, max_workers=args.max_workers,
                   s3_secret=args.s3_secret, service_account=args.service_account,
                   operator_namespace=args.operator_namespace)
    if args.k8s_command == "render":
        from .spec import load_spec

        print(dump(render_rayjob(load_spec(args.job), o)), end="")
    else:
        print(dump(render_raycluster(o)), end="")
    return 0
