"""MLflow tracking against a real MLflow tracking server (sqlite store) started here on loopback."""

import subprocess
import sys
import time
import urllib.request

import pytest

from dreambooth_ray import job, tracking
from dreambooth_ray.spec import SpecError, parse_spec
from dreambooth_ray.storage import Storage
from dreambooth_ray.tracking import History

from conftest import _free_port, tiny_spec


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination",
                             str(tmp / "artifacts"), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(30)
    log.close()


def test_credentials_in_the_uri_are_refused_naming_the_field():
    with pytest.raises(SpecError, match=r"tracking\.mlflow\.uri.*credentials.*MLFLOW_TRACKING_USERNAME"):
        parse_spec({"name": "j", "subject": {"name": "a", "images": "x", "class": "dog"},
                    "tracking": {"mlflow": {"uri": "https://alice:secret@mlflow.example:5000"}}})


def test_an_unreachable_server_fails_the_job_before_any_compute(ray_cluster, tmp_path, toy_images):
    spec = parse_spec(tiny_spec(str(tmp_path / "store"), str(toy_images),
                                tracking={"mlflow": {"uri": f"http://127.0.0.1:{_free_port()}"}}))
    t0 = time.time()
    with pytest.raises(tracking.TrackingError, match="tracking.mlflow.uri: cannot use the MLflow server"):
        job.run_job(spec)
    assert time.time() - t0 < 60
    assert not (tmp_path / "store" / "priors").exists() and not (tmp_path / "store" / "checkpoints").exists()


def test_a_subject_is_one_mlflow_run_with_params_metrics_and_artifacts(ray_cluster, mlflow_server, tmp_path,
                                                                       toy_images):
    from mlflow.tracking import MlflowClient

    data = tiny_spec(str(tmp_path / "store"), str(toy_images), samples={"validation_every": 2},
                     tracking={"mlflow": {"uri": mlflow_server, "experiment": "dogs"}})
    spec = parse_spec(data)
    [r] = job.run_job(spec)
    assert r.status == "done"

    client = MlflowClient(tracking_uri=mlflow_server)  # read back through the server
    exp = client.get_experiment_by_name("dogs")
    [run] = client.search_runs([exp.experiment_id])
    store = Storage(str(tmp_path / "store"))
    out = ("outputs", "t", "toy")
    record, trained = store.read_json(*out, "job.json"), store.read_json(*out, "train.json")
    assert run.info.run_name == "toy" and run.info.status == "FINISHED"
    assert run.data.tags["dreambooth_ray.run"] == record["run"] and run.data.tags["model"] == record["model"]
    p = run.data.params
    assert p["train.steps"] == "4" and p["subject.name"] == "toy" and p["model"] == "tiny"
    assert p["prior.loss_weight"] == str(spec.prior.loss_weight)
    history = History.read(store, *out, "history", trained["run"])
    for k in ("loss", "prior_loss", "lr"):
        logged = sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
        assert [(m.step, m.value) for m in logged] == [(h["step"], h[k]) for h in history], k
    assert history[-1]["loss"] == record["metrics"]["loss"]

    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "job.json", "validation"} <= arts
    steps = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert steps == {"validation/step-0000002", "validation/step-0000004"}
    local = client.download_artifacts(run.info.run_id, "samples.png", str(tmp_path / "dl"))
    assert open(local, "rb").read() == (tmp_path / "store" / "outputs" / "t" / "toy" / "samples.png").read_bytes()

    # A re-run skips the finished subject and logs nothing new.
    [again] = job.run_job(spec)
    assert again.status == "skipped" and len(client.search_runs([exp.experiment_id])) == 1
