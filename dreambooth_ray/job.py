"""A job, stage by stage: spec -> priors -> train -> SR -> export -> samples, for each subject.

Every stage leaves a record in storage when it finishes, and a re-run skips what is recorded:
prior images that exist, a training run whose `train.json` exists (or resumes it from its last
checkpoint), and a subject whose `job.json` exists (written last, so it means "complete").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import ray
from rich.console import Console

from . import checkpoint, cluster, encode, export, identifiers, images, models, preflight, priors, report, samples, tracking, train
from .console import RAY_ERRORS, Board, Reporter, View, log_files, save_logs, save_ray_errors
from .identity import run_name, sr_run_name
from .spec import JobSpec, SpecError, Subject
from .storage import Storage, io_counts

@dataclass
class SubjectResult:
    name: str
    status: str  # "done", "skipped" (already complete) or "failed" (see error)
    model: str
    samples: str
    steps: int
    final_loss: float | None
    seconds: float
    stages: dict = field(default_factory=dict)  # stage -> "ran" | "skipped"
    error: str | None = None
    train_start: float | None = None  # wall-clock seconds since the epoch, when training ran
    train_end: float | None = None
    timeline: dict = field(default_factory=dict)  # seconds by stage (see console.TIMELINE); bytes_written, bytes_read


# No CPU of its own: on a CPU cluster the training lanes hold the CPUs, and this light task (load the
# exported model, a few sample images) would otherwise wait for a lane to go idle.
@ray.remote(num_cpus=0)
def finalize(spec: JobSpec, subject: Subject, ckpt, out: tuple[str, ...], record: dict, run: str,
             sr_ckpt=None, sr_run: str | None = None) -> tuple[str, str]:
    """Load the exported pipeline(s), render the sample grid (through the SR stage when there is
    one), then write job.json (the completion mark)."""
    storage = Storage(spec.storage, spec.s3)
    t0, io_start = time.perf_counter(), io_counts()
    pipe, base = _stage_model(spec, storage, out, "base", run, ckpt)
    record.update({k: base[k] for k in ("lora", "lora_bytes", "base_model", "dtype", "exported_by") if k in base})
    timeline = record.setdefault("timeline", {})
    if base["exported_by"] == "training workers":  # the worker's own, final-checkpoint stall included
        worker = dict(base.get("timeline") or {})
        worker.pop("worker_started_at", None)
        for key in ("bytes_written", "bytes_read"):  # added to the encode task's, already there
            timeline[key] = timeline.get(key, 0) + worker.pop(key, 0)
        timeline.update(worker)
    # A workers' export happened during training; here the exported model is only loaded back.
    timeline["export"] = base["seconds"]
    sr_pipe = None
    if sr_ckpt is not None:
        sr_pipe, sr_export = _stage_model(spec, storage, out, "sr", sr_run, sr_ckpt)
        record.update(sr_model=sr_export["model"], sr_exported_by=sr_export["exported_by"], sr_dtype=sr_export["dtype"])
        timeline["export"] += sr_export["seconds"]
        timeline["sr"] = max(0.0, timeline.get("sr", 0.0) - sr_export["seconds"])  # counted once, as export
        for key in ("bytes_written", "bytes_read"):  # the SR workers' checkpoints and export
            timeline[key] = timeline.get(key, 0) + (sr_export.get("timeline") or {}).get(key, 0)
    timeline["export"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    items = samples.render(pipe, subject, spec.samples, spec.train.resolution)
    if sr_pipe is not None:
        items = samples.through_sr(items, sr_pipe, spec.sr, spec.samples.seed)
    storage.write_bytes(samples.png_bytes(samples.grid(items)), *out, "samples.png")
    timeline["samples"] = time.perf_counter() - t0
    t0 = time.perf_counter()  # the UIs' formats, the samples beside them and the model card (export.write_formats)
    record.update(export.write_formats(spec, subject, storage, out, pipe, record["dtype"], items))
    timeline["export"] += time.perf_counter() - t0
    for key, now, then in zip(("bytes_written", "bytes_read"), io_counts(), io_start):  # this task's part
        timeline[key] = timeline.get(key, 0) + now - then
    record["timeline"] = {k: round(v, 3) for k, v in timeline.items()}
    export.write_record(spec, storage, out, {**record, "model": base["model"],
                                             "samples": storage.url(*out, "samples.png")})
    return base["model"], storage.url(*out, "samples.png"), record["timeline"]


def _stage_model(spec: JobSpec, storage: Storage, out: tuple[str, ...], stage: str, run: str, ckpt):
    """A stage's trained pipeline, and its export record: the training workers' export of this run,
    else (fp32 asked of a bf16-weights/fp16 run, or a failed worker export) one made here from the
    final checkpoint, in fp32."""
    exported = storage.read_json(*out, export.FOLDERS[stage][1])
    if exported and exported.get("run") == run:  # no checkpoint round trip
        return export.load_exported(spec, exported), {**exported, "exported_by": "training workers"}
    packed = (storage.read_json(*out, "train.json") or {}).get("pack") if stage == "base" else None
    with checkpoint.local_copy(ckpt) as ckpt_dir:
        pipe = export.trained_pipeline(spec, ckpt_dir, stage, packed["index"] if packed else None)
    made = export.write_model(spec, storage, pipe, out, stage)
    return pipe, {**made, "exported_by": "final checkpoint", "dtype": "fp32", "seconds": 0.0}


@ray.remote(num_cpus=0)
def prior_task(cache: priors.PriorCache, spec: JobSpec, use_gpu: bool, reporter: Reporter) -> dict:
    """One per distinct class: the subjects that need these images wait on this task's result."""
    reporter.stage("class images", f"{spec.prior.num_class_images} class images -> {cache.url}",
                 total=spec.prior.num_class_images)
    counts = priors.generate(cache, spec, use_gpu, on_progress=lambda done, todo: reporter.progress(
        spec.prior.num_class_images - todo + done, spec.prior.num_class_images))
    yours = f"{counts['own']} of yours ({cache.own}), " if "own" in counts else ""
    reporter.stage("ready", f"{yours}{counts['cached']} cached, {counts['generated']} generated")
    return {"key": cache.key, "url": cache.url, **counts}


@ray.remote(num_cpus=0)
def subject_task(spec, subject, identity, use_gpu, prior_counts, queued_at: float, submitted_at: float,
                 reporter: Reporter, lanes, packed: dict | None = None) -> SubjectResult:
    """One subject, start to finish; its failure is its own result, never the batch's."""
    t0 = time.perf_counter()
    # Ray starts this task once its class images exist (a dependency) and a slot was free (the window).
    timeline = {"waiting_for_a_slot": submitted_at - queued_at, "waiting_for_class_images": time.time() - submitted_at}
    try:
        return _run_subject(spec, subject, Storage(spec.storage, spec.s3), identity, use_gpu, prior_counts, timeline,
                            reporter, lanes, packed)
    except Exception as e:  # isolation: whatever went wrong is recorded, the other subjects go on
        msg = _first_line(e)
        reporter.stage("failed", f"FAILED: {msg}")
        return SubjectResult(subject.name, "failed", "", "", 0, None, time.perf_counter() - t0, error=msg,
                             timeline={k: round(v, 3) for k, v in timeline.items()})


def _first_line(e: BaseException) -> str:
    if isinstance(e, ray.exceptions.RayTaskError):
        e = e.cause or e
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _outcome(ref: ray.ObjectRef) -> dict:
    try:
        return ray.get(ref)
    except Exception as e:
        return {"error": _first_line(e)}


def capacity(spec: JobSpec, use_gpu: bool) -> int:
    """How many subjects can train at once on this cluster, given each run's worker count: as many
    as its GPUs (or CPUs, less one on a one-machine cluster) allow, counting what its autoscaler can add
    (an autoscaling cluster may start with no workers). When it has room for no run now and can't
    say what it will scale to, `max_concurrent_subjects`, else 1."""
    room = cluster.capacity_of("GPU" if use_gpu else "CPU")
    if not use_gpu and room >= 1 and cluster.driver_node_cpus() >= room:
        # One machine (every CPU the cluster has or can reach is the driver's): one CPU stays for the
        # job's own work (the driver, class-image actors, exports, samples). On 2 CPUs, two 1-CPU lanes
        # took 1.9x one lane's makespan (benchmarks/batch_makespan.py).
        room -= 1
    fits = room // spec.train.num_workers
    if fits < 1:
        return spec.max_concurrent_subjects or 1
    return min(fits, spec.max_concurrent_subjects or 1 << 30)


def run_job(spec: JobSpec, console: Console | None = None) -> list[SubjectResult]:
    console = console or Console(stderr=True)
    storage = Storage(spec.storage, spec.s3)
    storage.check_writable()  # before any compute: no bucket / no permission fails here
    use_gpu = cluster.use_gpu(spec)  # the spec's choice, else GPUs now or GPUs the autoscaler can add
    if spec.train.mixed_precision == "fp16" and not use_gpu:
        raise SpecError("train.mixed_precision: 'fp16' needs GPUs and this cluster has none (use 'bf16' or 'fp32')")
    if not use_gpu and spec.train.cpu_problem():
        raise SpecError(f"train: {spec.train.cpu_problem()}; this cluster has no GPUs")
    identity = models.identity(spec.model, spec.s3)
    refused = preflight.check(spec, storage, planned_runs(spec, storage, identity),
                              cluster.gpu_memory() if use_gpu else None)
    tracking.check(spec)  # the MLflow server answers (before any compute)
    # Every concurrent run's workers from the autoscaler at once (nothing asked if the cluster has them).
    cluster.request_workers(use_gpu, min(capacity(spec, use_gpu), len(spec.subjects)) * spec.train.num_workers)

    board, logs_before, errors_before = Board.remote(), log_files(), len(RAY_ERRORS)
    try:
        with View(console, board) as view:
            results, prior_refs = _run_subjects(spec, storage, identity, use_gpu, console, board, view, refused)
    finally:
        cluster.release()  # idle nodes may scale down now
        save_logs(storage, spec.name, skip=logs_before)
        save_ray_errors(storage, spec.name, since=errors_before)
        ray.kill(board)
    ordered = [results[s.name] for s in spec.subjects]
    storage.write_json({"job": spec.name, "priors": [_outcome(ref) for ref in prior_refs.values()],
                        "subjects": [asdict(r) for r in ordered]}, "outputs", spec.name, "results.json")
    try:
        console.print(f"report -> {report.build(spec, storage)}", highlight=False, markup=False, soft_wrap=True)
    except Exception as e:  # noqa: BLE001 -- every subject is trained and stored; only the page failed
        console.print(f"warning: report.html not written ({type(e).__name__}: {e}); "
                      f"`dreambooth-ray report` retries", highlight=False, markup=False)
    return ordered


def _run_subjects(spec: JobSpec, storage: Storage, identity: str, use_gpu: bool, console: Console, board, view: View,
                  refused: dict[str, list[str]] | None = None):
    """`refused`: subjects the preflight refused for their photos ({name: a line per bad file}): they fail
    here, before any compute of theirs (no class images for them alone), and the others run."""
    queued_at = time.time()
    results: dict[str, SubjectResult] = {}
    for name, lines in (refused or {}).items():
        results[name] = SubjectResult(name, "failed", "", "", 0, None, 0.0, error="; ".join(lines))
        console.print(f"{name}: FAILED before any compute:\n  " + "\n  ".join(lines), highlight=False, markup=False)
    subjects = [s for s in spec.subjects if s.name not in results]
    # Priors: one task per distinct cache key, started now; subjects depend on their class's task,
    # so Ray starts each subject as soon as its own priors are ready (others may still be generating).
    prior_refs: dict[str, ray.ObjectRef] = {}
    subject_priors, prior_keys = [], []
    for subject in subjects:
        cache = priors.PriorCache.for_subject(spec, subject, storage, identity) if spec.prior.enabled else None
        if cache and cache.key not in prior_refs:
            prior_refs[cache.key] = prior_task.remote(cache, spec, use_gpu, Reporter(f"priors {cache.prompt!r}", board))
        subject_priors.append(prior_refs[cache.key] if cache else None)
        prior_keys.append(cache.key if cache else None)

    # With train.pack, the subjects still to train go in packs of that many (one run each, pack_task); a
    # subject already trained goes on alone (export, samples), as without packing.
    pending: list[tuple[str, object]] = []
    fresh, fresh_runs = [], []
    for subject, pref, key in zip(subjects, subject_priors, prior_keys):
        run = run_name(spec, subject, identity, key)
        if _packable(storage, spec, subject, run):
            fresh.append((subject, pref))
            fresh_runs.append((subject.name, run))
        else:
            pending.append(("subject", (subject, pref, None)))
    pending += [("pack", [fresh[i] for i in group]) for group in pack_groups(spec, storage, fresh_runs)]

    # Training lanes: up to `capacity` worker groups, each training subject after subject (or pack after
    # pack); Ray's scheduler places each lane's workers wherever resources free up. Twice as many in
    # flight, so that one subject's export and samples overlap the next one's training in its lane.
    window = min(capacity(spec, use_gpu), max(len(pending), 1))
    lanes = train.TrainingQueue.remote(spec, "base", use_gpu, lanes=window)
    packs = sum(kind == "pack" for kind, _ in pending)
    console.print(f"job {spec.name}: {len(subjects)} subject(s)" + (f", {len(fresh)} in {packs} pack(s)" if packs else "")
                  + f", up to {window} at once, {len(prior_refs)} prior set(s)", highlight=False)
    window *= 2
    running: dict[ray.ObjectRef, tuple] = {}
    while pending or running:
        # Packs and subject tasks each up to `window` in flight: a pack's subjects finishing (export,
        # samples) never hold back the next pack from a lane.
        waiting, pending = pending, []
        for kind, what in waiting:
            if sum(r[0] == kind for r in running.values()) >= window:
                pending.append((kind, what))
                continue
            if kind == "pack":
                ref = pack_task.remote(spec, [s for s, _ in what], identity, use_gpu, [p for _, p in what],
                                       [Reporter(s.name, board) for s, _ in what], lanes, queued_at, time.time())
            else:
                subject, pref, packed = what
                ref = subject_task.remote(spec, subject, identity, use_gpu, pref, queued_at, time.time(),
                                          Reporter(subject.name, board), lanes, packed)
            running[ref] = (kind, what)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
        view.refresh()
        if not ready:
            continue
        kind, what = running.pop(ready[0])
        if kind == "pack":  # its subjects go on alone: export was the workers', samples and the rest are theirs
            try:
                trained = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 -- the pack task itself died
                trained = {s.name: {"error": _first_line(e)} for s, _ in what}
            for subject, pref in what:
                got = trained.get(subject.name, {"error": "not trained by its pack"})
                if "error" in got:
                    _finish(spec, storage, results, console, SubjectResult(subject.name, "failed", "", "", 0, None, 0.0,
                                                                           error=got["error"]), announce=True)
                else:
                    pending.append(("subject", (subject, pref, got["packed"])))
            continue
        name = what[0].name
        try:
            r = ray.get(ready[0])
        except Exception as e:  # its class's prior task failed, so the subject never started
            r = SubjectResult(name, "failed", "", "", 0, None, 0.0, error=_first_line(e))
            console.print(f"{name}: FAILED: {r.error}", highlight=False, markup=False)
        _finish(spec, storage, results, console, r)
    ray.get(lanes.close.remote())  # idle lanes end now
    return results, prior_refs


def _finish(spec: JobSpec, storage: Storage, results: dict, console: Console, r: SubjectResult,
            announce: bool = False) -> None:
    """A subject's result recorded (and logged to MLflow when the spec asks)."""
    if announce:
        console.print(f"{r.name}: FAILED: {r.error}", highlight=False, markup=False)
    results[r.name] = r
    if spec.tracking.mlflow is not None:
        try:
            rid = tracking.log_subject(spec, next(s for s in spec.subjects if s.name == r.name), storage, r)
            if rid:
                console.print(f"{r.name}: MLflow run {rid}", highlight=False, markup=False)
        except Exception as e:  # noqa: BLE001 -- the subject is trained and stored; only its tracking failed
            console.print(f"{r.name}: warning: not logged to MLflow ({type(e).__name__}: {e})",
                          highlight=False, markup=False)


def planned_runs(spec: JobSpec, storage: Storage, identity: str) -> list[tuple[str, str, int]]:
    """(what, run name, workers) of every training run the job may resume, for the preflight."""
    runs, fresh = [], []  # fresh: (subject, run) of the subjects still to train, when packing
    sr_identity = models.identity(spec.sr.model, spec.s3) if spec.sr.enabled else None
    for s in spec.subjects:
        key = priors.PriorCache.for_subject(spec, s, storage, identity).key if spec.prior.enabled else None
        runs.append((f"subject {s.name}", run_name(spec, s, identity, key), spec.train.num_workers))
        if _packable(storage, spec, s, runs[-1][1]):
            fresh.append((s.name, runs[-1][1]))
        if sr_identity:
            sr_key = (priors.PriorCache.for_sr(spec, s, storage, identity, sr_identity).key
                      if spec.sr.prior_preservation else None)
            runs.append((f"subject {s.name} (SR)", sr_run_name(spec, s, sr_identity, sr_key),
                         spec.stage_train("sr").num_workers))
    for group in pack_groups(spec, storage, fresh):  # the packs _run_subjects will make (when no subject is refused)
        runs.append((f"the pack of {', '.join(fresh[i][0] for i in group)}",
                     pack_name(spec, [fresh[i][1] for i in group]), spec.train.num_workers))
    return runs


def _run_subject(spec, subject, storage, identity, use_gpu, prior_counts, timeline: dict, reporter: Reporter,
                 lanes=None, packed: dict | None = None) -> SubjectResult:
    """`packed`: this subject was just trained in a pack (pack_task): its train.json is the pack's work."""
    t0 = time.perf_counter()
    say = reporter.say
    out = ("outputs", spec.name, subject.name)
    prior_key = prior_counts["key"] if prior_counts else None
    # `identifier: auto` is deterministic given the model identity and seed, so the run is named
    # before resolving it: a finished subject is skipped without loading anything.
    name = run_name(spec, subject, identity, prior_key)
    sr_name = sr_prior = None
    if spec.sr.enabled:
        sr_identity = models.identity(spec.sr.model, spec.s3)
        sr_prior = (priors.PriorCache.for_sr(spec, subject, storage, identity, sr_identity)
                    if spec.sr.prior_preservation else None)
        sr_name = sr_run_name(spec, subject, sr_identity, sr_prior and sr_prior.key)
    complete = f"{name}+{sr_name}" if sr_name else name  # what job.json's "run" says when all is done
    record = storage.read_json(*out, "job.json")
    if record and record.get("run") == complete:
        reporter.stage("skipped", f"already complete ({record['model']}); nothing to do")
        return SubjectResult(subject.name, "skipped", record["model"], record["samples"], record["step"],
                             record.get("metrics", {}).get("loss"), time.perf_counter() - t0,
                             {s: "skipped" for s in ("train", "export", "samples")})
    subject = _resolve_identifier(spec, subject, None if packed else say)  # a pack said it before training
    stages: dict[str, str] = {}
    train_start = train_end = None
    trained = storage.read_json(*out, "train.json")
    if trained and trained.get("run") == name:
        ckpt = ray.train.Checkpoint(trained["checkpoint"], storage.ray_storage()[1])
        metrics = trained["metrics"]
        if packed:
            stages["train"], train_start, train_end = "ran", packed["train_start"], packed["train_end"]
            timeline.update(packed["timeline"])
        else:
            say(f"training already finished ({trained['checkpoint']})")
            stages["train"] = "skipped"
    else:
        t = spec.train
        reporter.stage("training", f"training {t.steps} steps, {t.method}, {t.describe_lr()}, {t.describe_batch()}, "
                     f"ZeRO-{t.zero_stage}, {t.mixed_precision}, {'GPU' if use_gpu else 'CPU'} (run {name})", total=t.steps)
        in_lane = _encode(spec, storage, subject, name, prior_key, use_gpu, reporter, timeline)
        train_start = time.time()
        validator = (samples.Validator.options(num_gpus=spec.samples.validation_gpus if use_gpu else 0)
                     .remote(spec, subject, name) if spec.samples.validation_every else None)
        try:
            result = train.fit(spec, subject, storage, name, prior_key, use_gpu, export_to=(out, name),
                               reporter=reporter, validator=validator, queue=lanes, encode_here=in_lane)
            if validator is not None:
                reporter.stage("validation", "rendering the last validation images")
                for e in ray.get(validator.drain.remote())["errors"]:
                    reporter.say(f"warning: validation images of {e}")
        finally:
            if validator is not None:
                ray.kill(validator)
        train_end = time.time()
        ckpt, metrics, stages["train"] = result.checkpoint, result.metrics, "ran"
        worker = dict(metrics.get("timeline") or {})  # the last attempt's, from rank 0
        if "worker_started_at" in worker:
            timeline["worker_start"] = worker.pop("worker_started_at") - train_start
        timeline.update(worker)
        storage.write_json({"run": name, "checkpoint": ckpt.path, "metrics": metrics}, *out, "train.json")
        encode.discard(storage, spec, name)  # trained: its frozen inputs are not needed again

    sr_ckpt = sr_metrics = None
    if sr_name:
        sr_start = time.perf_counter()
        encoded = timeline.get("encode", 0.0)
        sr_ckpt, sr_metrics, stages["sr"] = _run_sr(spec, subject, storage, out, sr_name, sr_prior, use_gpu, reporter,
                                                    timeline)
        # its class images, training and export (its encode task is under "encode")
        timeline["sr"] = time.perf_counter() - sr_start - (timeline.get("encode", 0.0) - encoded)

    reporter.stage("samples", "exporting and rendering samples")
    record = {"run": complete, "subject": subject.name, "sr_metrics": sr_metrics, "identifier": subject.identifier,
              "instance_prompt": subject.instance_text, "metrics": metrics,
              # Photos with a mask weighting the subject loss, and with their own caption (train.masked_loss).
              **{k: v[0] for k, v in images.side_files(subject.images, spec.s3).items()
                 if k != "masks" or spec.train.masked_loss != "off"},
              "priors": {k: prior_counts[k] for k in ("key", "url", "class_images", "own") if k in prior_counts}
              if prior_counts else None,
              "timeline": timeline}
    model_url, samples_url, timeline = ray.get(finalize.options(num_gpus=1 if use_gpu else 0).remote(
        spec, subject, ckpt, out, record, name, sr_ckpt, sr_name))
    stages.update(export="ran", samples="ran")
    reporter.stage("done", f"model -> {model_url}; samples -> {samples_url}")
    seconds = time.perf_counter() - t0 + (packed["seconds"] if packed else 0.0)  # and its share of the pack's task
    return SubjectResult(subject.name, "done", model_url, samples_url, int(metrics.get("step", spec.train.steps)),
                         metrics.get("loss"), seconds, stages, train_start=train_start,
                         train_end=train_end, timeline=timeline)


def _resolve_identifier(spec: JobSpec, subject: Subject, say=None) -> Subject:
    """`identifier: auto` resolved (deterministic: model, seed, vocabulary window); `say`s it and the
    identifier's warnings when given."""
    tokenizer = models.load_tokenizer(spec.model, spec.s3)
    if subject.identifier == "auto":
        subject = identifiers.resolve(subject, tokenizer, spec.train.seed, spec.identifiers)
        if say:
            say(f"identifier: auto -> {subject.identifier!r} ({subject.instance_text!r})")
    for w in models.identifier_warnings(tokenizer, subject.identifier, subject.class_noun) if say else ():
        say(f"warning: {w}")
    return subject


PACK_RECORD = "pack.json"  # a packed subject's pack, written before it trains


def pack_name(spec: JobSpec, runs: list[str]) -> str:
    """A pack's run: named by its subjects' runs, in order (each subject's adapter is its row of the pack)."""
    return f"pack-{spec.fingerprint(runs)}"


def pack_groups(spec: JobSpec, storage: Storage, fresh: list[tuple[str, str]]) -> list[list[int]]:
    """The packs of the subjects still to train ((name, run) each, in spec order), as index lists: first
    each pack an earlier attempt started (its members' pack.json) whose members all still train the same
    runs, so it resumes from its checkpoint whatever was added, fixed or finished since; then the rest
    in spec order, `train.pack` at a time."""
    at = {member: i for i, member in enumerate(fresh)}
    groups, taken = [], set()
    for name, _ in fresh:
        rec = storage.read_json("outputs", spec.name, name, PACK_RECORD)
        listed = rec.get("members") if isinstance(rec, dict) else None
        if not isinstance(listed, list) or not all(isinstance(m, list) and len(m) == 2
                                                   and all(isinstance(x, str) for x in m) for m in listed):
            continue  # none, or not one we wrote: the subject is grouped by position
        members = [tuple(m) for m in listed]
        idx = [at.get(m) for m in members]
        if (members and None not in idx and not taken & set(idx) and len(members) <= spec.train.pack
                and rec.get("pack") == pack_name(spec, [r for _, r in members])):
            groups.append(idx)
            taken.update(idx)
    rest = [i for i in range(len(fresh)) if i not in taken]
    return groups + [rest[i : i + spec.train.pack] for i in range(0, len(rest), spec.train.pack)]


def _packable(storage: Storage, spec: JobSpec, subject: Subject, run: str) -> bool:
    """Packed when it still trains, unless a solo run of it (`pack: 1`) left a checkpoint: it resumes that."""
    if spec.train.pack <= 1 or not _needs_training(storage, spec, subject, run):
        return False
    path, fs = storage.ray_storage("checkpoints", spec.name)  # where train.fit keeps the run's checkpoints
    return not checkpoint.complete_steps((f"{path}/{run}", fs))


def _needs_training(storage: Storage, spec: JobSpec, subject: Subject, run: str) -> bool:
    out = ("outputs", spec.name, subject.name)
    done = [(storage.read_json(*out, f) or {}).get("run", "") for f in ("job.json", "train.json")]
    return not any(r == run or r.startswith(f"{run}+") for r in done)


@ray.remote(num_cpus=0)
def pack_task(spec: JobSpec, subjects: list[Subject], identity: str, use_gpu: bool, prior_refs: list,
              reporters: list[Reporter], lanes, queued_at: float, submitted_at: float) -> dict[str, dict]:
    """A pack's training: each subject's class images, identifier and frozen inputs, then one run for
    all of them (train.fit_pack), whose workers export each subject's adapter. Returns {subject name:
    {"packed": ...} for its subject task, or {"error": why}}: a subject whose class images failed fails
    alone and the others train without it."""
    storage, results, members, t0 = Storage(spec.storage, spec.s3), {}, [], time.perf_counter()

    def failed(m_subject, reporter, e, when: str = "") -> None:  # on the board and in the result, as a subject task's
        msg = _first_line(e)
        reporter.stage("failed", f"FAILED{when}: {msg}")
        results[m_subject.name] = {"error": msg}

    for subject, ref, reporter in zip(subjects, prior_refs, reporters):
        try:  # its class images, its identifier: a subject whose own step fails fails alone
            counts = ray.get(ref) if ref is not None else None
            key = counts["key"] if counts else None
            name = run_name(spec, subject, identity, key)
            resolved = _resolve_identifier(spec, subject, reporter.say)
        except Exception as e:  # noqa: BLE001
            failed(subject, reporter, e)
            continue
        members.append({"subject": resolved, "run_name": name, "prior_key": key, "reporter": reporter,
                        "export_to": (("outputs", spec.name, subject.name), name), "validator": None})
    if not members:
        return results
    # As a subject task's: the time before a slot, then before its class images (here: every member's).
    timeline = {"waiting_for_a_slot": submitted_at - queued_at, "waiting_for_class_images": time.time() - submitted_at}
    pack = pack_name(spec, [m["run_name"] for m in members])
    for m in members:  # so that a re-run packs them together again (pack_groups) and resumes this run
        storage.write_json({"pack": pack, "members": [[x["subject"].name, x["run_name"]] for x in members]},
                           *m["export_to"][0], PACK_RECORD)
    t = spec.train
    for m in members:
        m["reporter"].stage("training", f"training {t.steps} steps in a pack of {len(members)} "
                            f"({', '.join(x['subject'].name for x in members)}), {t.method}, {t.describe_lr()}, "
                            f"{t.describe_batch()}, {t.mixed_precision}, {'GPU' if use_gpu else 'CPU'} "
                            f"(run {m['run_name']}, pack {pack})", total=t.steps)
    t1 = time.perf_counter()
    todo = [m for m in members if stage_needs_encoding(spec, storage, m["run_name"])]
    in_lane = use_gpu and bool(todo)  # as _run_subject: on GPUs the lane encodes first
    if todo and not in_lane:
        for m in todo:
            m["reporter"].say(f"encoding the prompts and images with the frozen {', '.join(sorted(encode.needed(spec)))}")
        ray.get(encode.encode_task.remote(spec, [(m["subject"], m["run_name"], m["prior_key"]) for m in todo]))
        timeline["encode"] = (time.perf_counter() - t1) / len(members)  # each subject's share
    train_start = time.time()
    if spec.samples.validation_every:
        for m in members:
            m["validator"] = (samples.Validator.options(num_gpus=spec.samples.validation_gpus if use_gpu else 0)
                              .remote(spec, m["subject"], m["run_name"]))
    try:
        trained = train.fit_pack(spec, members, storage, pack, use_gpu, queue=lanes, encode_here=in_lane)
        for m in members:
            if m["validator"] is not None:
                for e in ray.get(m["validator"].drain.remote())["errors"]:
                    m["reporter"].say(f"warning: validation images of {e}")
    except Exception as e:  # noqa: BLE001 -- the pack's subjects fail together; the job goes on
        for m in members:
            failed(m["subject"], m["reporter"], e, " (its pack's training)")
        return results
    finally:
        for m in members:
            if m["validator"] is not None:
                ray.kill(m["validator"])
    train_end = time.time()
    for i, m in enumerate(members):
        result = trained[m["run_name"]]
        out = m["export_to"][0]
        storage.write_json({"run": m["run_name"], "checkpoint": result.checkpoint.path, "metrics": result.metrics,
                            "pack": {"run": pack, "index": i, "subjects": [x["subject"].name for x in members]}},
                           *out, "train.json")
        encode.discard(storage, spec, m["run_name"])
        started = (result.metrics.get("timeline") or {}).get("worker_started_at")
        results[m["subject"].name] = {"packed": {
            "train_start": train_start, "train_end": train_end, "seconds": (time.perf_counter() - t0) / len(members),
            "timeline": {**timeline, **({"worker_start": (started - train_start) / len(members)} if started else {})}}}
    return results


def stage_needs_encoding(spec: JobSpec, storage: Storage, run: str, stage: str = "base") -> bool:
    return bool(encode.needed(spec, stage)) and not storage.exists(*encode.where(spec, run))


def _encode(spec: JobSpec, storage: Storage, subject: Subject, run: str, prior_key: str | None, use_gpu: bool,
            reporter: Reporter, timeline: dict, stage: str = "base") -> bool:
    """A run's frozen inputs (encode.py), before it trains, unless stored. On CPUs a task computes them,
    beside the lane's previous subject; on GPUs the lane does, before it loads the model
    (train.encode_first): the lanes hold the GPUs an encode task would wait for. True: the lane encodes."""
    if not stage_needs_encoding(spec, storage, run, stage):
        return False
    frozen = ", ".join(sorted(encode.needed(spec, stage)))
    if use_gpu:
        reporter.say(f"the training lane encodes the prompts and images with the frozen {frozen} first")
        return True
    t1 = time.perf_counter()
    reporter.say(f"encoding the prompts and images with the frozen {frozen}")
    done = ray.get(encode.encode_task.remote(spec, [(subject, run, prior_key)], stage))
    timeline["encode"] = timeline.get("encode", 0.0) + time.perf_counter() - t1
    for key in ("bytes_written", "bytes_read"):
        timeline[key] = timeline.get(key, 0) + done[key]
    return False


def _run_sr(spec, subject, storage, out, name, prior_cache, use_gpu, reporter: Reporter, timeline: dict):
    """The SR stage: fine-tune the SR model on the subject (resumable like the base stage), its frozen
    inputs encoded first as the base stage's are."""
    done = storage.read_json(*out, "sr.json")
    if done and done.get("run") == name:
        reporter.say(f"SR training already finished ({done['checkpoint']})")
        return ray.train.Checkpoint(done["checkpoint"], storage.ray_storage()[1]), done["metrics"], "skipped"
    if prior_cache is not None:
        counts = priors.generate(prior_cache, spec, use_gpu)
        reporter.say(f"SR class images at {prior_cache.resolution}px: {counts['cached']} cached, "
                   f"{counts['generated']} generated")
    s = spec.sr
    reporter.stage("training", f"SR stage: {s.input_resolution or spec.train.resolution}->{s.output_resolution}px, "
                 f"{s.steps} steps, noise augmentation {s.noise_aug:g} (run {name})", total=s.steps)
    prior_key = prior_cache and prior_cache.key
    in_lane = _encode(spec, storage, subject, name, prior_key, use_gpu, reporter, timeline, "sr")
    result = train.fit(spec, subject, storage, name, prior_key, use_gpu, stage="sr", export_to=(out, name),
                       reporter=reporter, encode_here=in_lane)
    storage.write_json({"run": name, "checkpoint": result.checkpoint.path, "metrics": result.metrics}, *out, "sr.json")
    encode.discard(storage, spec, name)
    return result.checkpoint, result.metrics, "ran"


def cmd_export(args, console) -> int:
    """`dreambooth-ray export JOB.yaml`: the UIs' formats, sample images and model card of subjects already
    trained, written from their exported model (nothing retrains); job.json records them."""
    from .spec import load_spec

    spec = load_spec(args.job)
    storage = Storage(spec.storage, spec.s3)
    asked = tuple(args.format) if args.format else None
    export.formats_of(models.family(spec.model, spec.s3), spec.train, asked)  # before any model loads
    unknown = sorted(set(args.subject or ()) - {s.name for s in spec.subjects})
    if unknown:
        raise SpecError(f"--subject: {', '.join(unknown)} not in {args.job}")
    missing = 0
    for subject in spec.subjects:
        if args.subject and subject.name not in args.subject:
            continue
        out = ("outputs", spec.name, subject.name)
        record = storage.read_json(*out, "job.json")
        if not record:
            console.print(f"{subject.name}: not trained yet (no job.json); run the job first")
            missing += 1
            continue
        trained = "lora" if record.get("lora") else "full"
        if trained != spec.train.method:
            raise SpecError(f"{args.job}: train.method is {spec.train.method!r}, but {subject.name} was trained "
                            f"as {trained!r}; export it with the spec it was trained with")
        subject = subject.model_copy(update={"identifier": record["identifier"]})
        pipe = export.load_exported(spec, record)
        rendered = None if args.no_samples else samples.render(pipe, subject, spec.samples, spec.train.resolution)
        made = export.write_formats(spec, subject, storage, out, pipe, record.get("dtype", "fp32"), rendered, asked)
        record.update(made)
        storage.write_json(record, *out, "job.json")
        console.print(f"{subject.name}: {', '.join(record['formats']) or 'no UI format'}; card {record['card']}")
    return 1 if missing else 0
