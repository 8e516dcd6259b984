"""Every manifest validated offline: KubeRay CRD schemas in strict mode, built-in kinds structurally,
cluster-launcher configs with Ray's own validation. A typo'd field must fail."""

import copy
import json
import re

import jsonschema
import pytest
import yaml

from dreambooth_ray import k8s
from dreambooth_ray.spec import load_spec

from conftest import ROOT

SCHEMAS = ROOT.parent / "shared" / "kuberay"


def strict(schema):
    """additionalProperties: false on every object schema that lists properties (unless it
    preserves unknown fields): the API server would silently prune a typo; we reject it."""
    schema = copy.deepcopy(schema)

    def walk(s):
        if isinstance(s, dict):
            if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
                s.setdefault("additionalProperties", False)
            for v in s.values():
                walk(v)
        elif isinstance(s, list):
            for v in s:
                walk(v)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd():
    assert SCHEMAS.is_dir(), f"KubeRay CRD schemas not found at {SCHEMAS} (the shared/ folder beside the checkout)"
    return {kind: jsonschema.Draft7Validator(strict(json.loads((SCHEMAS / f"{plural}.v1.schema.json").read_text())))
            for kind, plural in (("RayJob", "rayjobs"), ("RayCluster", "rayclusters"))}


NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
META = {"type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": NAME, "namespace": NAME, "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
LABEL_SELECTOR = {"type": "object", "additionalProperties": False,
                  "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}
PEER = {"type": "object", "additionalProperties": False,
        "properties": {"podSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR}}
BUILTIN = {
    "ConfigMap": {"required": ["apiVersion", "kind", "metadata", "data"], "properties": {
        "apiVersion": {"const": "v1"}, "kind": {"const": "ConfigMap"}, "metadata": META,
        "data": {"type": "object", "additionalProperties": {"type": "string"}}}},
    "ServiceAccount": {"required": ["apiVersion", "kind", "metadata"], "properties": {
        "apiVersion": {"const": "v1"}, "kind": {"const": "ServiceAccount"}, "metadata": META}},
    "NetworkPolicy": {"required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
        "apiVersion": {"const": "networking.k8s.io/v1"}, "kind": {"const": "NetworkPolicy"}, "metadata": META,
        "spec": {"type": "object", "additionalProperties": False, "required": ["podSelector"], "properties": {
            "podSelector": LABEL_SELECTOR,
            "policyTypes": {"type": "array", "items": {"enum": ["Ingress", "Egress"]}},
            "ingress": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                "from": {"type": "array", "items": PEER},
                "ports": {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
                    "protocol": {"enum": ["TCP", "UDP", "SCTP"]}, "port": {"type": ["integer", "string"]}}}}}}}}}}},
}


def validate(doc, crd):
    kind = doc.get("kind")
    if kind in crd:
        errors = list(crd[kind].iter_errors(doc))
        assert not errors, f"{kind} {doc['metadata']['name']}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])
        jsonschema.Draft7Validator(META).validate(doc["metadata"])  # DNS-1123 names, which the CRD leaves open
    elif kind in BUILTIN:
        jsonschema.Draft7Validator({"type": "object", "additionalProperties": False, **BUILTIN[kind]}).validate(doc)
    else:
        pytest.fail(f"unexpected kind {kind!r}")


def pod_templates(doc):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    yield spec["headGroupSpec"]["template"]
    for g in spec["workerGroupSpecs"]:
        yield g["template"]
    if "submitterPodTemplate" in doc["spec"]:
        yield doc["spec"]["submitterPodTemplate"]


MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_shipped_manifests_validate(path, crd):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate(doc, crd)
    text = path.read_text()
    assert not re.search(r"(?i)(aws_secret_access_key|aws_access_key_id)\s*:", text), "no keys in manifests"


def test_shipped_manifests_are_the_renderer_output():
    o = k8s.K8sOptions()
    assert (ROOT / "k8s" / "rayjob.yaml").read_text() == k8s.dump(k8s.render_rayjob(load_spec(ROOT / "jobs" / "batch-example.yaml"), o))
    assert (ROOT / "k8s" / "raycluster.yaml").read_text() == k8s.dump(k8s.render_raycluster(o))


@pytest.mark.parametrize("opts", [
    dict(),
    dict(gpu_type="NVIDIA-H100-80GB-HBM3", gpus_per_worker=8, max_workers=16, image="registry.example/db:1"),
    dict(gpu_type="NVIDIA-L4", max_workers=1, namespace="team-a", s3_secret="minio-creds"),
])
def test_rendered_variants_validate_and_hold_the_required_settings(opts, crd):
    o = k8s.K8sOptions(**opts)
    docs = k8s.render_rayjob(load_spec(ROOT / "jobs" / "batch-example.yaml"), o)
    for doc in docs:
        validate(doc, crd)
    rayjob = next(d for d in docs if d["kind"] == "RayJob")
    spec, rc = rayjob["spec"], rayjob["spec"]["rayClusterSpec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert rc["enableInTreeAutoscaling"] is True
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["serviceType"] == "ClusterIP"
    assert "nvidia.com/gpu" not in json.dumps(head)
    # What the driver on the head reads for the GPU count the autoscaler can reach (cluster.py).
    env = {e["name"]: e["value"] for e in head["template"]["spec"]["containers"][0]["env"]}
    assert env == {"DREAMBOOTH_RAY_USE_GPU": "1", "DREAMBOOTH_RAY_MAX_GPUS": str(o.max_workers * o.gpus_per_worker)}
    [workers] = rc["workerGroupSpecs"]
    assert workers["minReplicas"] == 0 and workers["maxReplicas"] == o.max_workers
    res = workers["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(o.gpus_per_worker)
    assert any(t["key"] == "nvidia.com/gpu" for t in workers["template"]["spec"]["tolerations"])
    if o.gpu_type:
        assert workers["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": o.gpu_type}
    for t in pod_templates(rayjob):
        assert t["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in t["spec"]["containers"]:
            assert c["image"] == o.image and c["securityContext"]["allowPrivilegeEscalation"] is False
        vols = {v["name"]: v for v in t["spec"].get("volumes", [])}
        if t is not spec["submitterPodTemplate"]:
            assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
            assert t["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": o.s3_secret, "optional": True}}]
    # The job spec travels as a ConfigMap mounted on the head, and the entrypoint reads it there.
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert yaml.safe_load(cm["data"]["job.yaml"])["name"] == "pets-batch"
    assert head["template"]["spec"]["volumes"][-1]["configMap"]["name"] == cm["metadata"]["name"]
    assert spec["entrypoint"].endswith(f"{k8s.SPEC_MOUNT}/job.yaml --address auto")
    netpol = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert {"protocol": "TCP", "port": 8265} in netpol["spec"]["ingress"][0]["ports"]


@pytest.mark.parametrize("mutate", [
    lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True),  # the classic typo
    lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("resouces", {}),
    lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("maxReplica", 3),
    lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("minReplicas", "0"),
    lambda d: d["spec"].__setitem__("submissionMode", 7),
], ids=["top-level", "container", "worker-group", "wrong-type", "mode-type"])
def test_a_typo_fails_validation(mutate, crd):
    doc = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d["kind"] == "RayJob")
    mutate(doc)
    with pytest.raises(AssertionError):
        validate(doc, crd)


def test_builtin_kind_typo_fails(crd):
    cm = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "rayjob.yaml").read_text()) if d["kind"] == "ConfigMap")
    cm["metdata"] = cm.pop("metadata")
    with pytest.raises(jsonschema.ValidationError):
        validate(cm, crd)


def test_render_refuses_local_paths_and_cli_prints_yaml(tmp_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "dreambooth_ray.cli", "k8s", "render", str(ROOT / "jobs" / "quickstart.yaml")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "storage" in p.stderr and "s3://" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "dreambooth_ray.cli", "k8s", "render", str(ROOT / "jobs" / "batch-example.yaml"),
                        "--gpu-type", "NVIDIA-A100-SXM4-80GB", "--max-workers", "3", "--operator-namespace", "ray-system"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    docs = list(yaml.safe_load_all(p.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob", "ServiceAccount", "NetworkPolicy"]
    assert "kubernetes.io/metadata.name: ray-system" in k8s.dump(docs[-1:])


@pytest.mark.parametrize("name", ["aws", "gcp", "local"])
def test_cluster_launcher_configs_pass_rays_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / f"{name}.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    config["max_worker"] = 2  # typo
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


def cloud_spec(**fields):
    from dreambooth_ray.spec import parse_spec

    spec = {"name": "pets", "model": "tiny", "storage": "s3://bucket/runs",
            "subjects": [{"name": "rex", "images": "s3://bucket/photos/rex", "class": "dog"}]}
    return parse_spec({**spec, **fields})


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("name", [
    "a" * 64,                          # far too long
    "x" * 26 + "-" + "y" * 37,         # the cut lands right after a '-'
    "My_Job.V2",                       # uppercase, '_' and '.'
    "9lives",
    "pets-batch",
])
def test_rayjob_names_are_what_kuberay_accepts(name, crd):
    docs = k8s.render_rayjob(cloud_spec(name=name), k8s.K8sOptions())
    for doc in docs:
        validate(doc, crd)  # the ConfigMap's and NetworkPolicy's derived names too
    rayjob = next(d for d in docs if d["kind"] == "RayJob")["metadata"]["name"]
    assert DNS1035.match(rayjob) and len(rayjob) <= 47, rayjob  # KubeRay's ValidateRayJobMetadata
    if name == "pets-batch":
        assert rayjob == "dreambooth-pets-batch"  # a name that needs no change keeps its exact form


def test_distinct_job_names_get_distinct_rayjobs():
    def rayjob(name):
        return next(d for d in k8s.render_rayjob(cloud_spec(name=name), k8s.K8sOptions()) if d["kind"] == "RayJob")["metadata"]["name"]

    long = "subject-batch-" + "a" * 40
    names = [long + "1", long + "2", "Rex", "rex", "re_x", "re.x"]
    assert len({rayjob(n) for n in names}) == len(names)
    assert rayjob(long + "1") == rayjob(long + "1")  # and the same name, the same object


def test_dashboard_admits_the_operator_namespace():
    docs = k8s.render_rayjob(cloud_spec(), k8s.K8sOptions(operator_namespace="kuberay-system"))
    netpol = next(d for d in docs if d["kind"] == "NetworkPolicy")
    dashboard, ray = netpol["spec"]["ingress"]
    assert dashboard["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert {"podSelector": {}} in dashboard["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}} in dashboard["from"]
    assert "namespaceSelector" not in json.dumps(ray)  # the other Ray ports stay namespace-internal


def test_rendered_spec_trains_on_gpus_unless_it_says_otherwise():
    def use_gpu(**train):
        docs = k8s.render_rayjob(cloud_spec(train=train), k8s.K8sOptions())
        return yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["job.yaml"])["train"]["use_gpu"]

    # The cluster starts with no GPU worker, so "GPUs if the cluster has any" would mean CPUs.
    assert use_gpu() is True
    assert use_gpu(use_gpu=False) is False


def test_render_refuses_local_models(tmp_path, crd):
    folder = tmp_path / "sd"
    folder.mkdir()
    sr = {"enabled": True, "output_resolution": 1024}
    for fields, bad in [({"model": str(folder)}, "model"), ({"model": "./models/sd"}, "model"),
                        ({"sr": {**sr, "model": str(folder)}}, "sr.model")]:
        with pytest.raises(k8s.K8sError, match=rf"^{re.escape(bad)} \("):
            k8s.render_rayjob(cloud_spec(**fields), k8s.K8sOptions())
    for fields in [{"model": "org/stable-diffusion"}, {"model": "tiny-if"}, {"sr": {**sr, "model": "tiny-x4"}},
                   {"sr": {**sr, "enabled": False, "model": str(folder)}}]:  # an SR stage that doesn't run
        for doc in k8s.render_rayjob(cloud_spec(**fields), k8s.K8sOptions()):
            validate(doc, crd)
