"""A job, stage by stage: spec -> priors -> train -> export -> samples, for each subject.

Every stage leaves a record in storage when it finishes, and a re-run skips what is recorded:
prior images that exist, a training run whose `train.json` exists (or resumes it from its last
checkpoint), and a subject whose `job.json` exists (written last, so it means "complete").
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field

import ray
from rich.console import Console

from . import export, models, priors, samples, train
from .images import load_subject_images
from .spec import JobSpec, SpecError, Subject
from .storage import Storage

log = logging.getLogger("dreambooth_ray")


@dataclass
class SubjectResult:
    name: str
    status: str  # "done" or "skipped" (already complete)
    model: str
    samples: str
    steps: int
    final_loss: float | None
    seconds: float
    stages: dict = field(default_factory=dict)  # stage -> "ran" | "skipped"


def run_name(spec: JobSpec, subject: Subject, model_identity: str, prior_key: str | None) -> str:
    # Settings that change the trained weights; checkpoint cadence and retry counts do not.
    t = spec.train.model_dump(exclude={"checkpoint_every", "keep_checkpoints", "max_failures", "use_gpu"})
    prior = spec.prior.model_dump(include={"enabled", "num_class_images", "loss_weight"})
    key = spec.fingerprint(model_identity, subject.model_dump(by_alias=True), prior, prior_key, t)
    return f"{subject.name}-{key}"


@ray.remote(num_cpus=1)
def finalize(spec: JobSpec, subject: Subject, ckpt, out: tuple[str, ...], record: dict) -> tuple[str, str]:
    """Export the trained pipeline, render its sample grid, then write job.json (the completion mark)."""
    storage = Storage(spec.storage, spec.s3)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.to_directory(tmp)
        pipe = export.trained_pipeline(spec, tmp)
        model_url = export.save(storage, pipe, out)
    items = samples.render(pipe, subject, spec.samples, spec.train.resolution)
    storage.write_bytes(samples.png_bytes(samples.grid(items)), *out, "samples.png")
    export.write_record(spec, storage, out, {**record, "samples": storage.url(*out, "samples.png")})
    return model_url, storage.url(*out, "samples.png")


def run_job(spec: JobSpec, console: Console | None = None, fail_at_step: int | None = None) -> list[SubjectResult]:
    console = console or Console(stderr=True)
    say = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    storage = Storage(spec.storage, spec.s3)
    storage.check_writable()  # before any compute: no bucket / no permission fails here
    use_gpu = spec.train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    if spec.train.mixed_precision == "fp16" and not use_gpu:
        raise SpecError("train.mixed_precision: 'fp16' needs GPUs and this cluster has none (use 'bf16' or 'fp32')")
    # Read every subject's photos now: a bad file fails the job before any GPU time is spent.
    for s in spec.subjects:
        load_subject_images(s.images, spec.train.resolution, spec.s3, spec.skip_bad_images)
    identity = models.identity(spec.model, spec.s3)
    results = []
    for subject in spec.subjects:
        results.append(_run_subject(spec, subject, storage, identity, use_gpu, say, fail_at_step))
    return results


def _run_subject(spec, subject, storage, identity, use_gpu, say, fail_at_step) -> SubjectResult:
    t0 = time.perf_counter()
    out = ("outputs", spec.name, subject.name)
    cache = priors.PriorCache.for_subject(spec, subject, storage, identity) if spec.prior.enabled else None
    name = run_name(spec, subject, identity, cache.key if cache else None)
    record = storage.read_json(*out, "job.json")
    if record and record.get("run") == name:
        say(f"[bold]{subject.name}[/]: already complete ({record['model']}); nothing to do")
        return SubjectResult(subject.name, "skipped", record["model"], record["samples"], record["step"],
                             record.get("metrics", {}).get("loss"), time.perf_counter() - t0,
                             {s: "skipped" for s in ("priors", "train", "export", "samples")})
    stages = {}

    if cache:
        say(f"[bold]{subject.name}[/]: prior images for {cache.prompt!r} -> {cache.url}")
        counts = priors.generate(cache, spec, use_gpu, on_progress=lambda d, n: say(f"  priors {d}/{n}"))
        say(f"  priors: {counts['cached']} cached, {counts['generated']} generated")
        stages["priors"] = "ran" if counts["generated"] else "skipped"

    trained = storage.read_json(*out, "train.json")
    if trained and trained.get("run") == name:
        say(f"[bold]{subject.name}[/]: training already finished ({trained['checkpoint']})")
        ckpt = ray.train.Checkpoint(trained["checkpoint"], storage.ray_storage()[1])
        metrics, stages["train"] = trained["metrics"], "skipped"
    else:
        t = spec.train
        say(f"[bold]{subject.name}[/]: training {t.steps} steps, ZeRO-{t.zero_stage}, {t.num_workers} worker(s), "
            f"{t.mixed_precision}, {'GPU' if use_gpu else 'CPU'} (run {name})")
        result = train.fit(spec, subject, storage, name, cache.key if cache else None, use_gpu, fail_at_step)
        ckpt, metrics, stages["train"] = result.checkpoint, result.metrics, "ran"
        storage.write_json({"run": name, "checkpoint": ckpt.path, "metrics": metrics}, *out, "train.json")

    say(f"[bold]{subject.name}[/]: exporting and rendering samples")
    record = {"run": name, "subject": subject.name, "metrics": metrics,
              "priors": {"key": cache.key, "url": cache.url} if cache else None}
    model_url, samples_url = ray.get(finalize.options(num_gpus=1 if use_gpu else 0).remote(
        spec, subject, ckpt, out, record))
    stages.update(export="ran", samples="ran")
    say(f"  model   -> {model_url}\n  samples -> {samples_url}")
    return SubjectResult(subject.name, "done", model_url, samples_url, int(metrics.get("step", spec.train.steps)),
                         metrics.get("loss"), time.perf_counter() - t0, stages)
