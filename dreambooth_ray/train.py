"""Base-model fine-tuning: Ray Train workers, each wrapping the UNet (and text encoder) in DeepSpeed ZeRO.

Training runs in lanes: a lane is one Ray Train run (a worker group) that takes subjects from a
`TrainingQueue` one after another, so processes, imports and DeepSpeed's process group are paid once
per lane rather than once per subject. Each subject is still its own run: its own checkpoints
(checkpoint.py: complete when every rank's upload is verified), resumed from its own latest one. A
lane whose worker fails ends; the queue retries the subject it held (when the error can pass) on a
new lane, which resumes it, and the other subjects go on.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import time
import uuid
from dataclasses import dataclass

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from . import checkpoint, encode, engine, export, models, pack, samples, snapshot, sr
from .images import load_subject_images
from .priors import PriorCache
from .spec import JobSpec, Subject
from .storage import Storage
from .storage import io_counts as storage_io_counts
from .tracking import History

log = logging.getLogger("dreambooth_ray")


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker of a lane: the queue's subjects, one after another, until it
    has none for this lane. Every rank takes the same subject (rank 0 draws it, the others follow)."""
    queue, lane = config["queue"], config["lane"]
    rank = ray.train.get_context().get_world_rank()
    n = 0
    while (item := ray.get(queue.take.remote(lane, rank, n))) is not None:
        n += 1
        run = train_pack if "members" in item else train_subject
        result = run({**item, "lane": lane}, rank)
        if rank == 0:
            ray.get(queue.finish.remote(lane, result))
        gc.collect()  # the subject's engine and model go before the next one loads
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def deterministic_kernels(on: bool) -> None:
    """Deterministic kernels in this worker, or the defaults. Strict: the attention backwards (flash,
    memory-efficient) pick their deterministic kernels only when non-deterministic ones would raise,
    not under warn_only; an op with no deterministic kernel fails the first step, naming itself.
    cuBLAS reads its workspace setting when the process makes its first handle: set before any step."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


class Phases:
    """Where an attempt's time goes (rank 0's view), for the job's per-subject timeline: each call adds
    the seconds since the last one to a phase."""

    def __init__(self):
        self.seconds = {"worker_started_at": time.time(), "checkpoint_stalls": 0.0, "validation_handover": 0.0}
        self.restart()

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.mark
        self.mark = now


def train_subject(config: dict, rank: int) -> dict:
    """One subject's run (one stage), on every rank of the lane; rank 0 returns {checkpoint, metrics}."""
    spec: JobSpec = config["spec"]
    subject: Subject = config["subject"]
    stage = config.get("stage", "base")
    cfg = spec.stage_train(stage)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    deterministic_kernels(cfg.deterministic)
    torch.manual_seed(cfg.seed)
    # Where this attempt's time goes (rank 0's view), for the job's per-subject timeline.
    io_start = storage_io_counts()
    phase = Phases()
    timeline = phase.seconds

    photos = load_subject_images(subject.images, cfg.resolution, spec.s3, spec.skip_bad_images, quiet=True)
    instance = [s.image for s in photos]
    classes = []
    if config["prior_key"]:  # class images at this stage's resolution
        classes = PriorCache(Storage(spec.storage, spec.s3), config["prior_key"], subject.class_text,
                             cfg.resolution, spec.prior).load(spec.prior.num_class_images)
    phase("photos_and_class_images")
    # The frozen parts' outputs, computed off the workers (encode.py): those parts are not loaded here.
    if config.get("encode_here"):
        encode_first(spec, [(subject, config["run_name"], config["prior_key"])], rank, stage)
        phase("encode")
    frozen = encode.load(Storage(spec.storage, spec.s3), spec, config["run_name"])
    skipped = sorted(encode.needed(spec, stage)) if frozen is not None else []
    loader = engine.partitioned_loader(cfg)  # ZeRO-3: the trained UNet or transformer built sharded
    parts = (models.load_sr_components(spec.sr.model, spec.s3, skip=skipped, partitioned=loader) if stage == "sr"
             else models.load_components(spec.model, spec.s3, loader, skip=skipped))
    phase("model_load")
    if stage == "sr":
        eng = sr.build(parts, instance, classes, subject.instance_text, subject.class_text, cfg, spec.sr,
                       spec.sr.input_resolution or spec.train.resolution, device, frozen=frozen)
    else:
        eng = engine.build(parts, instance, classes, subject.instance_text,
                           subject.class_text, cfg, spec.prior.loss_weight, device,
                           geometry=[s.geometry for s in photos], frozen=frozen, masks=[s.mask for s in photos],
                           captions=[subject.prompt(s.caption) if s.caption else None for s in photos])
    lora = cfg.method == "lora"
    tag = subject.name if stage == "base" else f"{subject.name} {stage}"
    phase("latent_cache_and_engine")  # VAE latents, frozen text embeddings, DeepSpeed set-up
    run_root = config["run_root"]  # (path, pyarrow filesystem) of this run's checkpoints
    start = checkpoint.restore(eng.ds, run_root, lora)
    phase("restore")
    reporter = config.get("reporter")
    if start and rank == 0:
        print(f"[{tag}] resumed from checkpoint at step {start}", flush=True)
        if reporter:
            reporter.say(f"resumed from checkpoint at step {start}")

    validator, handovers = config.get("validator"), []
    history = History(spec, subject, config["run_name"], stage) if rank == 0 else None
    t0, last, metrics, saved = time.perf_counter(), start, None, None
    for step in range(start, cfg.steps):
        phase.restart()
        sums = eng.step(step, rank)  # on the training device: NCCL reduces no CPU tensors
        torch.distributed.all_reduce(sums)  # report the mean over all ranks, not rank 0's sample
        sums /= ctx.get_world_size()
        done = step + 1
        elapsed = time.perf_counter() - t0
        metrics = {
            "step": done, "loss": sums[0].item(), "instance_loss": sums[1].item(), "prior_loss": sums[2].item(),
            "lr": eng.lr(), "steps_per_s": (done - last) / max(elapsed, 1e-9),
            "node_id": ray.get_runtime_context().get_node_id(),  # rank 0's node: where the run was placed
            "lane": config["lane"],  # the worker group that trained it
            "parts_not_loaded": skipped,  # frozen parts whose outputs the encode task computed
        }
        phase("steps")
        waited, eng.checkpoint_wait = eng.checkpoint_wait, 0.0  # a checkpoint's stall, paid inside the step
        timeline["steps"] -= waited
        timeline["checkpoint_stalls"] += waited
        if done == start + 1:  # after the first optimizer step: Adam makes its state there
            checkpoint.prepare(eng.ds, done, run_root, lora, cfg.checkpoint_upload)
            phase("checkpoint_buffers")
        if rank == 0:
            history.add(metrics)
            if reporter:
                reporter.progress(done, cfg.steps, metrics["loss"])
            print(f"[{tag}] step {done}/{cfg.steps} loss {metrics['loss']:.4f} "
                  f"(subject {metrics['instance_loss']:.4f}, prior {metrics['prior_loss']:.4f}) "
                  f"lr {metrics['lr']:.2e} {metrics['steps_per_s']:.2f} steps/s", flush=True)
        if validator is not None and done % spec.samples.validation_every == 0:
            # Every rank gathers (ZeRO-3: a collective); rank 0 puts a CPU copy in the object store and goes
            # on. The copy is this process's object: it must outlive the hand-over (see below).
            sd = export.live_state_dict(eng.ds, cfg, rank)
            if rank == 0:
                handovers.append(validator.receive.remote(done, samples.to_wire(sd)))
            phase("validation_handover")
        # Ray Train hears of the run at checkpoints only: each report waits for the controller's poll
        # (~2 s), which would throttle every step; every rank reports, as Ray requires.
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            # The stall: what training waits for (sync: the write and upload; async: the previous
            # checkpoint's upload if it is still running, and the copy to host memory, which on a CPU
            # the next optimizer step waits for, above).
            metrics["timeline"] = {k: round(v, 3) for k, v in timeline.items()}
            checkpoint.save(eng.ds, done, metrics, started_at=start, run_root=run_root, lora=lora,
                            upload=cfg.checkpoint_upload, keep=cfg.keep_checkpoints)
            previous, saved = saved, done
            phase("checkpoint_stalls")
            if rank == 0:
                history.flush()
            _maybe_inject_fault(config.get("fault"), done, previous, rank, run_root)
    ray.get(handovers)  # the validator holds every copy of the weights before this process may end
    if saved is not None:  # the last checkpoint is complete before the subject counts as trained
        checkpoint.wait_uploaded(checkpoint.step_dir(run_root, saved))
    snapshot.release(eng.ds)
    # Bytes this attempt's workers moved (photos and class images read, checkpoint shards written and
    # read back), summed over the ranks: a collective every rank reaches here, once its upload is done.
    io = torch.tensor([now - then for now, then in zip(storage_io_counts(), io_start)], dtype=torch.float64,
                      device=eng.ds.device)
    torch.distributed.all_reduce(io)
    timeline["bytes_written"], timeline["bytes_read"] = (int(v) for v in io.tolist())
    if config.get("export_to"):  # also after a resume at the last step: a failed export is redone
        # The whole attempt's timeline (the last checkpoint's stall included) travels with the export.
        record = export.from_engine(eng.ds, spec, Storage(spec.storage, spec.s3), *config["export_to"], rank,
                                    timeline={k: round(v, 3) for k, v in timeline.items()}, stage=stage)
        if record:
            print(f"[{tag}] exported {record['model']} ({record['dtype']}, {record['seconds']:.1f} s)", flush=True)
    if rank != 0:
        return {}
    checkpoint.prune(run_root, cfg.keep_checkpoints)
    final = checkpoint.latest(run_root)
    if metrics is None and final is not None:  # resumed at the last step: the checkpoint's own metrics
        metrics = checkpoint.read_metrics(final)
    return {"checkpoint": final.path if final else None, "metrics": metrics or {}}


def encode_first(spec: JobSpec, runs: list[tuple[Subject, str, str | None]], rank: int, stage: str = "base") -> None:
    """A GPU job's frozen inputs (encode.py), computed by the lane's rank 0 on its own GPU before any
    model loads: an encode task would wait for a GPU that the lanes hold. The frozen parts are loaded,
    used and gone before the denoiser loads, so the worker never holds both. The other ranks wait."""
    storage = Storage(spec.storage, spec.s3)
    if rank == 0:
        todo = [r for r in runs if not storage.exists(*encode.where(spec, r[1]))]
        if todo:
            encode.encode_runs(spec, todo, stage)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    torch.distributed.barrier()


def train_pack(config: dict, rank: int) -> dict:
    """A pack's run (pack.py) on every rank of the lane: its subjects' adapters in one engine and one
    checkpointed run; each subject gets its solo run's history, progress, validation images and export.
    Rank 0 returns {checkpoint, metrics, members: {run name: that subject's metrics}}."""
    spec: JobSpec = config["spec"]
    cfg, members, run_root = spec.train, config["members"], config["run_root"]
    storage = Storage(spec.storage, spec.s3)
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    deterministic_kernels(cfg.deterministic)
    torch.manual_seed(cfg.seed)
    phase = Phases()
    timeline = phase.seconds

    if config.get("encode_here"):
        encode_first(spec, [(m["subject"], m["run_name"], m["prior_key"]) for m in members], rank)
        phase("encode")
    built = []
    for m in members:
        subject = m["subject"]
        photos = load_subject_images(subject.images, cfg.resolution, spec.s3, spec.skip_bad_images, quiet=True)
        classes = (PriorCache(storage, m["prior_key"], subject.class_text, cfg.resolution, spec.prior)
                   .load(spec.prior.num_class_images) if m["prior_key"] else [])
        built.append(pack.Member([s.image for s in photos], classes, subject.instance_text, subject.class_text,
                                 cfg.seed, geometry=[s.geometry for s in photos],
                                 frozen=encode.load(storage, spec, m["run_name"]), masks=[s.mask for s in photos],
                                 captions=[subject.prompt(s.caption) if s.caption else None for s in photos]))
    phase("photos_and_class_images")
    skipped = sorted(encode.needed(spec)) if all(b.frozen is not None for b in built) else []
    # The frozen base whole (the adapters are ZeRO-0), read in the dtype it trains in, as a solo LoRA run's
    parts = models.load_components(spec.model, spec.s3, engine.partitioned_loader(cfg.model_copy(update={"zero_stage": 0})),
                                   skip=skipped)
    phase("model_load")
    eng = pack.build(parts, built, cfg, spec.prior.loss_weight, device)
    phase("latent_cache_and_engine")
    start = checkpoint.restore(eng.ds, run_root, lora=True)
    phase("restore")
    reporters = [m.get("reporter") for m in members]
    if start and rank == 0:
        print(f"[{config['run_name']}] resumed from checkpoint at step {start}", flush=True)
        for r in filter(None, reporters):
            r.say(f"resumed the pack from its checkpoint at step {start}")
    histories = [History(spec, m["subject"], m["run_name"]) for m in members] if rank == 0 else []
    handovers, t0, last, saved, metrics = [], time.perf_counter(), start, None, None
    for step in range(start, cfg.steps):
        phase.restart()
        sums = eng.step(step, rank)  # [subjects, (loss, subject loss, prior loss)]
        torch.distributed.all_reduce(sums)
        sums /= ctx.get_world_size()
        done = step + 1
        rate = (done - last) / max(time.perf_counter() - t0, 1e-9)
        each = {m["run_name"]: {"step": done, "loss": v[0], "instance_loss": v[1], "prior_loss": v[2], "lr": eng.lr(),
                                "steps_per_s": rate, "lane": config["lane"], "pack": config["run_name"],
                                "pack_size": len(members), "parts_not_loaded": skipped,
                                "node_id": ray.get_runtime_context().get_node_id()}
                for m, v in zip(members, sums.tolist())}
        metrics = {"step": done, "loss": float(sums[:, 0].sum()), "lr": eng.lr(), "steps_per_s": rate,
                   "node_id": ray.get_runtime_context().get_node_id(), "lane": config["lane"], "members": each}
        phase("steps")
        waited, eng.checkpoint_wait = eng.checkpoint_wait, 0.0
        timeline["steps"] -= waited
        timeline["checkpoint_stalls"] += waited
        if done == start + 1:
            checkpoint.prepare(eng.ds, done, run_root, True, cfg.checkpoint_upload)
            phase("checkpoint_buffers")
        if rank == 0:
            for m, h, r in zip(members, histories, reporters):
                h.add(each[m["run_name"]])
                if r:
                    r.progress(done, cfg.steps, each[m["run_name"]]["loss"])
            print(f"[{config['run_name']}] step {done}/{cfg.steps} "
                  + " ".join(f"{m['subject'].name} {each[m['run_name']]['loss']:.4f}" for m in members)
                  + f" lr {metrics['lr']:.2e} {rate:.2f} steps/s", flush=True)
        if spec.samples.validation_every and done % spec.samples.validation_every == 0:
            for i, m in enumerate(members):  # each subject's adapter, as its solo run hands its own over
                if rank == 0 and m.get("validator") is not None:
                    handovers.append(m["validator"].receive.remote(done, samples.to_wire(eng.subject_state_dict(i))))
            phase("validation_handover")
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            metrics["timeline"] = {k: round(v, 3) for k, v in timeline.items()}
            checkpoint.save(eng.ds, done, metrics, started_at=start, run_root=run_root, lora=True,
                            upload=cfg.checkpoint_upload, keep=cfg.keep_checkpoints)
            previous, saved = saved, done
            phase("checkpoint_stalls")
            for h in histories:
                h.flush()
            _maybe_inject_fault(config.get("fault"), done, previous, rank, run_root)
    ray.get(handovers)
    if saved is not None:
        checkpoint.wait_uploaded(checkpoint.step_dir(run_root, saved))
    snapshot.release(eng.ds)
    if rank != 0:  # the adapters are replicated (ZeRO-0): rank 0 holds every subject's
        return {}
    dtype = export.EXPORT_DTYPES[export.export_dtype(spec)]
    # Each subject's share of the pack's time: what its record's timeline sums to is what it cost.
    share = {k: round(v / len(members), 3) for k, v in timeline.items() if k != "worker_started_at"}
    pipe = None  # one pipeline, each subject's adapter loaded in turn
    for i, m in enumerate(members):  # also after a resume at the last step: a failed export is redone
        try:
            record, pipe = export.from_state_dict(spec, storage, m["export_to"][0], m["run_name"],
                                                  eng.subject_state_dict(i, dtype), timeline=dict(share), pipe=pipe)
        except Exception as e:  # noqa: BLE001 -- trained: the job exports it from the pack's checkpoint (pack.unpacked)
            print(f"[{m['subject'].name}] export failed ({type(e).__name__}: {e}); the job exports it from the "
                  f"pack's checkpoint", flush=True)
            pipe = None
            continue
        print(f"[{m['subject'].name}] exported {record['model']} ({record['dtype']}, {record['seconds']:.1f} s)",
              flush=True)
    checkpoint.prune(run_root, cfg.keep_checkpoints)
    final = checkpoint.latest(run_root)
    if metrics is None and final is not None:
        metrics = checkpoint.read_metrics(final)
    return {"checkpoint": final.path if final else None, "metrics": metrics or {}}


def _maybe_inject_fault(fault: tuple[str, int] | None, step: int, previous: int | None, rank: int,
                        run_root) -> None:
    """Test hook (the queue passes it to a subject's first attempt only): ("raise", N) fails every
    rank after step N's checkpoint; ("kill", N) SIGKILLs rank 0's process once that checkpoint is
    complete in storage, a real worker death; ("kill-uploading", N) SIGKILLs it right after step N's
    save, once the checkpoint before it is complete: N's is then still uploading if the test holds
    it at the store."""
    if not fault or fault[1] != step:
        return
    how = fault[0]
    if how == "raise":
        raise RuntimeError(f"injected failure after step {step} (test hook)")
    if how.startswith("kill") and rank == 0:
        import os
        import signal

        wait_for = step if how == "kill" else previous
        deadline = time.time() + 120
        while wait_for is not None and wait_for not in checkpoint.complete_steps(run_root) and time.time() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainResult:
    checkpoint: ray.train.Checkpoint  # the last one, in the storage filesystem
    metrics: dict


def fit(spec: JobSpec, subject: Subject, storage: Storage, run_name: str, prior_key: str | None,
        use_gpu: bool, fault: tuple[str, int] | None = None, stage: str = "base",
        export_to: tuple[tuple[str, ...], str] | None = None, reporter=None, validator=None,
        queue=None, encode_here: bool = False) -> TrainResult:
    """Run (or resume) one subject's training stage ('base' or 'sr') in a lane of `queue` (a queue of
    its own, one lane, when none is given). Same `run_name` + storage = resume from the last checkpoint.

    Retries are ours, not Ray's FailureConfig: a re-run of the same run resumes from its last
    checkpoint, but only failures that can pass (a dead worker or node, an I/O or communication
    error) are retried. An error that recurs every time (a TypeError from a model the code cannot
    drive, a bad setting) fails at once, under its own name, instead of reloading the model
    `max_failures` more times and ending as "Training failed due to worker errors".
    `encode_here`: the lane computes the run's frozen inputs first (`encode_first`), not an encode task."""
    item = {**work_item(spec, subject, storage, run_name, prior_key, fault, stage, export_to, reporter, validator),
            "encode_here": encode_here}
    out = _train(spec, item, stage, use_gpu, queue, repr(subject.name))
    return TrainResult(ray.train.Checkpoint(out["checkpoint"], item["run_root"][1]), out["metrics"])


def _train(spec: JobSpec, item: dict, stage: str, use_gpu: bool, queue, what: str) -> dict:
    """`item` trained in a lane of `queue` (of its own, one lane, when None): rank 0's {checkpoint, metrics}."""
    own = queue is None
    if own:
        queue = TrainingQueue.remote(spec, stage, use_gpu, lanes=1)
    try:
        out = ray.get(queue.train.remote(item))
    finally:
        if own:
            ray.get(queue.close.remote())
    if "error" in out:
        raise TrainingError(out["error"])
    if out["checkpoint"] is None:
        raise RuntimeError(f"training of {what} finished without a checkpoint")
    return out


def fit_pack(spec: JobSpec, members: list[dict], storage: Storage, run_name: str, use_gpu: bool,
             fault: tuple[str, int] | None = None, queue=None, encode_here: bool = False) -> dict[str, TrainResult]:
    """Run (or resume) a pack's training (pack.py) in a lane of `queue`, as `fit` does one subject's.
    `members`: {subject, run_name, prior_key, export_to, reporter, validator} each, in the pack's order
    (each subject's adapter is its row of the pack). Returns each member's result by its run name; the
    checkpoint is the pack's."""
    from .console import Chorus

    storage_path, storage_fs = storage.ray_storage("checkpoints", spec.name)
    item = {"id": f"{run_name}/{uuid.uuid4().hex[:8]}", "spec": spec, "members": members, "stage": "base",
            "fault": fault, "reporter": Chorus([m.get("reporter") for m in members]), "run_name": run_name,
            "run_root": (f"{storage_path}/{run_name}", storage_fs), "max_failures": spec.train.max_failures,
            "encode_here": encode_here}
    out = _train(spec, item, "base", use_gpu, queue, f"pack {run_name!r}")
    ckpt, metrics = ray.train.Checkpoint(out["checkpoint"], storage_fs), out["metrics"]
    return {m["run_name"]: TrainResult(ckpt, {**metrics["members"][m["run_name"]], "timeline": metrics.get("timeline")})
            for m in members}


def work_item(spec: JobSpec, subject: Subject, storage: Storage, run_name: str, prior_key: str | None,
              fault: tuple[str, int] | None = None, stage: str = "base",
              export_to: tuple[tuple[str, ...], str] | None = None, reporter=None, validator=None) -> dict:
    """What a lane needs to train one subject's run (see `fit`)."""
    storage_path, storage_fs = storage.ray_storage("checkpoints", spec.name)
    return {"id": f"{run_name}/{uuid.uuid4().hex[:8]}", "spec": spec, "subject": subject, "prior_key": prior_key,
            "stage": stage, "fault": fault, "export_to": export_to, "reporter": reporter, "validator": validator,
            "run_root": (f"{storage_path}/{run_name}", storage_fs), "run_name": run_name,
            "max_failures": spec.stage_train(stage).max_failures}


@ray.remote(num_cpus=0)
class TrainingQueue:
    """Subjects waiting for a lane, and the lanes (Ray Train runs of one stage's worker count) that
    train them: up to `lanes` at once, started while subjects wait and none is idle, each ending
    once it has waited `idle_s` for a subject (its workers' resources go back to Ray, which placed
    them). A lane that fails hands its subject back: retried on a new lane while the error can pass
    and attempts remain (`max_failures`), else that subject alone fails."""

    def __init__(self, spec: JobSpec, stage: str, use_gpu: bool, lanes: int, idle_s: float = 5.0):
        self.spec, self.stage, self.use_gpu, self.max_lanes, self.idle_s = spec, stage, use_gpu, lanes, idle_s
        self.pending: collections.deque = collections.deque()
        self.results: dict[str, asyncio.Future] = {}
        self.rounds: dict[str, list] = {}  # lane -> the items its rank 0 drew, in order (None: the end)
        self.holding: dict[str, dict | None] = {}  # live lane -> the item it trains now
        self.failures: dict[str, int] = {}  # item id -> failed attempts
        self.lane_errors = 0  # lanes in a row that failed holding no subject (e.g. no worker could start)
        self.changed = asyncio.Condition()
        self.closed = False

    async def train(self, item: dict) -> dict:
        """Queue one subject's run; returns {checkpoint, metrics} from rank 0, or {error}."""
        self.results[item["id"]] = asyncio.get_running_loop().create_future()
        async with self.changed:
            self.pending.append(item)
            self.changed.notify_all()
        self._start_lanes()
        return await self.results[item["id"]]

    async def take(self, lane: str, rank: int, n: int) -> dict | None:
        """The lane's n-th subject: rank 0 draws it (waiting up to idle_s for one), the others get the same."""
        async with self.changed:
            rounds = self.rounds.setdefault(lane, [])
            if rank == 0 and len(rounds) == n:
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self.pending or self.closed), self.idle_s)
                except asyncio.TimeoutError:
                    pass
                item = self.pending.popleft() if self.pending else None
                rounds.append(item)
                self.holding[lane] = item
                self.changed.notify_all()
            else:
                await self.changed.wait_for(lambda: len(rounds) > n)
            item = rounds[n]
        if item is None:
            return None
        return {**item, "fault": item["fault"] if not self.failures.get(item["id"]) else None}

    def finish(self, lane: str, result: dict) -> None:
        item, self.holding[lane] = self.holding[lane], None
        self.lane_errors = 0
        self._resolve(item["id"], result)

    async def _watch(self, lane: str, ref: ray.ObjectRef) -> None:
        """Until the lane's run returns or raises (its task dying included)."""
        error, can_pass = None, False
        try:
            await ref
        except Exception as e:  # noqa: BLE001 -- the queue decides: retry the lane's subject, or fail it
            cause = worker_error(e)
            error, can_pass = describe(cause), retryable(cause)
        item = self.holding.pop(lane, None)
        self.rounds.pop(lane, None)
        if error is not None:
            if item is None:
                self.lane_errors += 1
                if self.lane_errors >= 3:  # lanes can't start at all: every waiting subject fails with it
                    while self.pending:
                        self._resolve(self.pending.popleft()["id"], {"error": error})
            else:
                failed = self.failures[item["id"]] = self.failures.get(item["id"], 0) + 1
                if can_pass and failed <= item["max_failures"]:
                    msg = f"attempt {failed} failed ({error}); resuming from the last checkpoint"
                    item["reporter"].say(msg) if item["reporter"] else log.warning("%s: %s", item["id"], msg)
                    async with self.changed:
                        self.pending.appendleft(item)
                        self.changed.notify_all()
                else:
                    self._resolve(item["id"], {"error": error})
        self._start_lanes()

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    def _resolve(self, item_id: str, result: dict) -> None:
        future = self.results.pop(item_id, None)
        if future is not None and not future.done():
            future.set_result(result)

    def _start_lanes(self) -> None:
        me = ray.get_runtime_context().current_actor  # (called from the actor's event loop)
        # a lane holding nothing is starting or waiting for a subject: it takes the next one
        while len(self.pending) > sum(v is None for v in self.holding.values()) and len(self.holding) < self.max_lanes:
            lane = f"lane-{uuid.uuid4().hex[:12]}"
            self.holding[lane] = None
            asyncio.get_running_loop().create_task(
                self._watch(lane, run_lane.remote(me, lane, self.spec, self.stage, self.use_gpu)))


@ray.remote(num_cpus=0)
def run_lane(queue, lane: str, spec: JobSpec, stage: str, use_gpu: bool) -> None:
    """One lane: a Ray Train run whose workers train the queue's subjects until it has none left."""
    cfg = spec.stage_train(stage)
    storage_path, storage_fs = Storage(spec.storage, spec.s3).ray_storage("checkpoints", spec.name, "lanes")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"queue": queue, "lane": lane},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
        # On GPUs, NCCL for CUDA tensors and gloo for any CPU tensor a collective meets: Ray's
        # default there is NCCL alone, which cannot reduce a CPU tensor.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=lane, storage_path=storage_path, storage_filesystem=storage_fs,
            # Ray's registry of this run spans subjects: each subject's run keeps and prunes its own.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=0),
        ),
    )
    trainer.fit()  # what it raises, the queue (which awaits this task) hears


class TrainingError(RuntimeError):
    """Training failed; the message is the underlying exception's type and first line."""


# Errors of the program or its input: the same code on the same model and settings raises them again.
_RECURRING = (TypeError, ValueError, KeyError, AttributeError, IndexError, NameError, ImportError,
              NotImplementedError, AssertionError, ZeroDivisionError)


def worker_error(e: BaseException) -> BaseException:
    """The exception that a training worker raised (rank 0's when several did), unwrapped from Ray's."""
    while True:
        failures = getattr(e, "worker_failures", None)
        if failures:
            e = failures[min(failures)]
        elif isinstance(e, ray.exceptions.RayTaskError) and e.cause is not None and e.cause is not e:
            e = e.cause
        else:
            return e


def retryable(e: BaseException) -> bool:
    from .errors import UserError

    if isinstance(e, ray.exceptions.RayActorError):  # a dead worker process or node
        return True
    return not isinstance(e, _RECURRING + (UserError,))


def describe(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
