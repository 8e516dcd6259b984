"""Experiment tracking: TensorBoard event files and the per-step history, always written (by the training
workers through `History`, and by the validation renderer through `tensorboard_events`), and MLflow (optional:
`tracking: {mlflow: {uri, experiment}}`). The writers live here, beside their readers (MLflow, the report),
so that the validation renderer and the report need not import training to use them.

One MLflow run per subject and training run: the resolved spec as params, every step's metrics, the
sample grid, the validation images and job.json as artifacts, and the model's location as a tag. The
job's driver logs a subject when it finishes or fails, from what the job wrote to storage: the
driver's environment holds the MLflow credentials, which never travel to the workers or into a spec.
A subject already logged for its run (a re-run) is not logged again.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid

from .errors import UserError
from .spec import JobSpec, Subject
from .storage import Storage

TAG_JOB, TAG_RUN = "dreambooth_ray.job", "dreambooth_ray.run"


class TrackingError(UserError, RuntimeError):
    """The tracking server cannot be used; the message says why."""


def _client(spec: JobSpec):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("tracking.mlflow needs the MLflow client: pip install 'dreambooth-ray[mlflow]' "
                            "(mlflow-skinny)") from None
    return MlflowClient(tracking_uri=spec.tracking.mlflow.uri)


@contextlib.contextmanager
def _few_retries():
    """MLflow's client retries a refused connection for minutes by default; a preflight should answer now."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def experiment_id(spec: JobSpec) -> str:
    client = _client(spec)
    name = spec.tracking.mlflow.experiment or spec.name
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def check(spec: JobSpec) -> None:
    """Before any compute: the client is installed, the server answers, the experiment exists or is made."""
    if spec.tracking.mlflow is None:
        return
    with _few_retries():
        try:
            experiment_id(spec)
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001 -- any failure here means no run could be logged
            raise TrackingError(f"tracking.mlflow.uri: cannot use the MLflow server at {spec.tracking.mlflow.uri} "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _params(spec: JobSpec, subject: Subject) -> dict[str, str]:
    data = spec.model_dump(by_alias=True, exclude={"subjects", "tracking", "s3"})
    data["subject"] = subject.model_dump(by_alias=True)
    flat: dict[str, str] = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            flat[prefix] = str(v)[:6000]  # MLflow's limit on a param's value

    walk("", data)
    return flat


def log_subject(spec: JobSpec, subject: Subject, storage: Storage, result) -> str | None:
    """Logs one finished (or failed) subject as an MLflow run; returns its run id (None: nothing to log)."""
    from mlflow.entities import Metric, Param, RunTag

    if spec.tracking.mlflow is None or result.status == "skipped":
        return None
    out = ("outputs", spec.name, subject.name)
    record = storage.read_json(*out, "job.json") or {}
    trained = storage.read_json(*out, "train.json") or {}
    run_key = record.get("run") or trained.get("run") or "failed"
    client = _client(spec)
    exp = experiment_id(spec)
    found = client.search_runs([exp], filter_string=f"tags.`{TAG_RUN}` = '{run_key}' and "
                                                    f"tags.`{TAG_JOB}` = '{spec.name}'", max_results=1)
    if found and result.status == "done":
        return None  # this run of this subject is logged already
    tags = {TAG_JOB: spec.name, TAG_RUN: run_key, "mlflow.runName": subject.name}
    if result.model:
        tags["model"] = result.model
    if result.error:
        tags["error"] = result.error[:5000]
    run = client.create_run(exp, tags=tags)
    rid = run.info.run_id
    params = [Param(k, v) for k, v in _params(spec, subject).items()]
    for k in range(0, len(params), 100):
        client.log_batch(rid, params=params[k:k + 100])
    history = History.read(storage, *out, "history", trained["run"]) if trained.get("run") else []
    metrics = [Metric(k, float(row[k]), int(row["time"] * 1000), row["step"])
               for row in history for k in History.KEYS if row.get(k) is not None]
    for k in range(0, len(metrics), 1000):
        client.log_batch(rid, metrics=metrics[k:k + 1000])
    client.log_batch(rid, tags=[RunTag("steps", str(result.steps))])
    with tempfile.TemporaryDirectory() as tmp:
        files = [(("samples.png",), ""), (("job.json",), "")]
        if trained.get("run"):
            for step in storage.listdir(*out, "validation", trained["run"]):
                files += [(("validation", trained["run"], step, n), f"validation/{step}")
                          for n in storage.listdir(*out, "validation", trained["run"], step)]
        for parts, where in files:
            data = storage.read_bytes(*out, *parts)
            if data is None:
                continue
            local = os.path.join(tmp, *parts)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "wb") as f:
                f.write(data)
            client.log_artifact(rid, local, where or None)
    client.set_terminated(rid, "FINISHED" if result.status == "done" else "FAILED")
    return rid


class History:
    """Rank 0's per-step metrics: TensorBoard event files under outputs/<job>/tensorboard/<subject>/, and JSON
    chunks, one per span of steps (outputs/<job>/<subject>/history/<run>/steps-<first>-<last>.json), both
    written to storage at each checkpoint. A resumed attempt rewrites the steps after its checkpoint, and
    `read` keeps the newest value of each step. The report's loss curves come from the chunks."""

    KEYS = ("loss", "instance_loss", "prior_loss", "lr", "steps_per_s")

    def __init__(self, spec: JobSpec, subject: Subject, run: str, stage: str = "base"):
        self.storage = Storage(spec.storage, spec.s3)
        self.folder = ("outputs", spec.name, subject.name, "history", run)
        self.tensorboard = tensorboard_folder(spec, subject)
        self.rows: list[dict] = []
        self.tag = "train" if stage == "base" else stage

    def add(self, metrics: dict) -> None:
        self.rows.append({"step": metrics["step"], "time": time.time(), **{k: metrics[k] for k in self.KEYS}})

    def flush(self) -> None:
        if self.rows:
            first, last = self.rows[0]["step"], self.rows[-1]["step"]
            self.storage.write_json({"steps": self.rows}, *self.folder, f"steps-{first:07d}-{last:07d}.json")
            with tensorboard_events(self.storage, self.tensorboard) as tb:
                for row in self.rows:
                    for k in self.KEYS:
                        tb.add_scalar(f"{self.tag}/{k}", row[k], row["step"])
            self.rows = []

    @staticmethod
    def read(storage: Storage, *folder: str) -> list[dict]:
        by_step: dict[int, dict] = {}
        chunks = [storage.read_json(*folder, name) or {} for name in sorted(storage.listdir(*folder))]
        for chunk in sorted(chunks, key=lambda c: c.get("steps", [{}])[0].get("time", 0)):
            for row in chunk.get("steps", []):
                by_step[row["step"]] = row  # written later: a resumed attempt's
        return [by_step[k] for k in sorted(by_step)]


def tensorboard_folder(spec: JobSpec, subject: Subject) -> tuple[str, ...]:
    """One TensorBoard run per subject: `tensorboard --logdir <storage>/outputs/<job>/tensorboard`."""
    return ("outputs", spec.name, "tensorboard", subject.name)


@contextlib.contextmanager
def tensorboard_events(storage: Storage, folder: tuple[str, ...]):
    """A TensorBoard writer whose event file goes to storage, complete, when the block ends. One file per
    block: tensorboardX writes from a background queue that `flush` does not drain, `close` does."""
    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory(prefix="dbr-tb-") as local:
        writer = SummaryWriter(local, filename_suffix=f".{uuid.uuid4().hex[:8]}")
        try:
            yield writer
        finally:
            writer.close()
        for name in os.listdir(local):
            with open(os.path.join(local, name), "rb") as f:
                storage.write_bytes(f.read(), *folder, name)
