"""DeepSpeed checkpoints, one folder per step under the run's root in storage. By default (async) every
rank copies its shard into host memory and a thread streams it to storage while training goes on
(snapshot.py); synchronously, it writes the shard locally and Ray Train uploads it. Either way every
file's stored size is checked, and `verified_upload` ends with this rank's marker file, `uploaded/rank-K`.

A step is complete, and may be resumed from, once `state.json` (rank 0's) and a marker from every
rank it names are there: a half-uploaded checkpoint is never offered for resume. Completion is read
from storage, not from Ray's registry of the run, because a training lane (train.py) runs many
subjects' runs inside one Ray Train run, and each subject resumes from its own checkpoints.

Trust boundary: checkpoints come from storage that others may be able to write. Nothing read from it
is unpickled with code execution: every torch.load here (DeepSpeed's own included, which asks for
weights_only=False) runs under torch's weights-only unpickler, with an allowlist of the three plain
data classes DeepSpeed pickles into its optimizer state. A bucket writer can still plant other
weights (the storage's permissions guard the weights' integrity), but cannot run code on a worker.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import threading

import ray.train
import torch

from . import snapshot
from .snapshot import delete_file, retrying, store_file
from .storage import count_io, dir_bytes

log = logging.getLogger("dreambooth_ray")

TAG = "ckpt"  # one DeepSpeed tag per Ray checkpoint directory


def _deepspeed_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only():
    """Every torch.load inside runs weights-only, even a caller's `weights_only=False` (torch reads
    TORCH_FORCE_WEIGHTS_ONLY_LOAD on each call): a planted pickle raises instead of running."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def step_dir(run_root: tuple[str, object], step: int) -> str:
    return f"{run_root[0]}/step-{step:07d}"


def save(engine, step: int, metrics: dict, started_at: int, run_root: tuple[str, object], lora: bool = False,
         upload: str = "async", keep: int | None = None) -> None:
    """Called by every rank: save this rank's shard to `step_dir(run_root, step)` and report it.

    `upload="async"`: training goes on while a background thread streams the shard to storage; the
    step becomes complete (resumable) once every rank's files are stored and verified; rank 0 then
    deletes the run's checkpoints older than its newest `keep` complete ones. `"sync"`: the shard is
    written locally and uploaded before training goes on. With LoRA only the adapters (the trainable
    parameters) are saved.
    """
    from ray.train import CheckpointUploadMode

    ctx = ray.train.get_context()
    tmp = tempfile.mkdtemp(prefix="dbr-ckpt-")
    dest = step_dir(run_root, step)
    # A crashed attempt may have left this rank's marker for this step: it goes before the shard is
    # rewritten, or the other ranks' new markers would complete a step whose shard is half-written.
    marker = f"{dest}/uploaded/rank-{ctx.get_world_rank():05d}"
    # async: the state is copied to host memory and a thread streams it straight to `dest` (no local
    # file); training waits only for the copy (a memcpy, not a file write), on a CPU not until the next
    # optimizer step (snapshot.py).
    writer = None
    if upload == "async":
        writer = snapshot.writer_for(engine)
        writer.begin(engine.checkpoint_engine, tmp, dest, run_root[1], stale_marker=marker)
    written = None
    try:
        if not writer:
            delete_file(run_root[1], marker)
        try:
            _save_state(engine, tmp, step, lora, writer)
        finally:
            if writer:
                written = writer.waiter()
        if ctx.get_world_rank() == 0:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                # started_at: the step this attempt began from (non-zero after a resume).
                json.dump({"step": step, "started_at": started_at, "world_size": ctx.get_world_size()}, f)
            with open(os.path.join(tmp, "metrics.json"), "w") as f:  # what a resume at the last step reports
                json.dump(metrics, f)
    except BaseException:
        if written:
            written(check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _uploads.pop(dest, None)  # a step saved again (a resumed attempt in this process) uploads again
    # Ray registers, in the lane's own run, a pointer to the subject's checkpoint (its name unique
    # within the lane, which carries other subjects' runs too).
    pointer = f"{ctx.get_storage().experiment_fs_path}/{os.path.basename(run_root[0])}-step-{step:07d}"
    pruning = (lambda: prune(run_root, keep)) if keep and ctx.get_world_rank() == 0 else None
    ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=os.path.basename(pointer),
        checkpoint_upload_fn=verified_upload(dest, run_root[1], ctx.get_world_rank(), pointer, prune=pruning,
                                             written=written),
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC if upload == "async" else CheckpointUploadMode.SYNC,
        delete_local_checkpoint_after_upload=True,
    )


def _save_state(engine, local: str, step: int, lora: bool, writer=None) -> None:
    """DeepSpeed's save of `engine` under `local`; through `writer` (begun) instead of its own engine if given."""
    # No zip CRC32 in this (training) process's torch.save: torch.load never checks it (a flipped byte
    # loads silently), and computing it was three quarters of a save's time (1.5 s against 0.37 s per
    # 512 MB here). The upload verifies every file's stored size.
    torch.serialization.set_crc32_options(False)
    if writer:
        engine.checkpoint_engine = writer
    try:  # device: where the state lived (the host copy would pickle as "cpu")
        engine.save_checkpoint(local, tag=TAG, client_state={"step": step, "device": str(engine.device)},
                               exclude_frozen_parameters=lora)
    finally:
        if writer:
            engine.checkpoint_engine = writer.inner


def prepare(engine, step: int, run_root: tuple[str, object], lora: bool = False, upload: str = "async") -> None:
    """Called by every rank after the first optimizer step (Adam's state exists from there): an async
    checkpoint's host buffers, allocated and mapped now rather than beside the first checkpoint's
    steps, where a CPU-only worker's fresh pages cost the next step ~2.5 s (2.2 GB here). DeepSpeed
    saves the state through the writer, which copies and writes nothing. A lane's next subject finds
    them there (snapshot.release)."""
    if upload != "async":
        return
    writer = snapshot.writer_for(engine)
    tmp = tempfile.mkdtemp(prefix="dbr-ckpt-plan-")
    writer.begin(engine.checkpoint_engine, tmp, None, run_root[1])
    try:
        _save_state(engine, tmp, step, lora, writer)
    finally:
        writer.end_plan()
        shutil.rmtree(tmp, ignore_errors=True)


def verified_upload(dest: str, fs, rank: int, pointer: str, prune=None, attempts: int = 6, streams: int = 8,
                    written=None):
    """A checkpoint upload that fails loudly and retries, in place of Ray's default copy.

    Ray's default (pyarrow copy_files) can drop an S3 multipart-upload error on the floor ("Error
    ignored when destroying file") and register a checkpoint with a missing file. Here each file is
    streamed with an explicit close (which raises), its stored size is checked, and a failed file is
    retried with backoff; then this rank's marker is written. Files go up `streams` at a time (a
    large file is itself a multipart upload with parallel parts in pyarrow's S3 stream). Ray gets
    back `pointer`, a folder in its run's storage naming `dest` (Ray accepts no checkpoint outside it).
    `written`: waits until an async checkpoint's streamed files are stored, and returns their bytes.
    """
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()

    def put(src: str | None, target: str, data: bytes = b"") -> None:
        def write(out):
            if src:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, 8 << 20)
            else:
                out.write(data)

        store_file(fs, target, write, attempts)

    def upload(ckpt: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        done = _uploads.setdefault(dest, _Upload())
        try:
            streamed = written() if written else 0
            files = [os.path.join(d, n) for d, _, names in os.walk(ckpt.path) for n in names]
            count_io(written=streamed + sum(map(os.path.getsize, files)))
            with ThreadPoolExecutor(streams) as pool:
                for f in [pool.submit(put, src, f"{dest}/{os.path.relpath(src, ckpt.path)}") for src in files]:
                    f.result()  # the first failure raises: no marker, so the step never becomes complete
            marker = str(streamed + sum(map(os.path.getsize, files))).encode()
            put(None, f"{dest}/uploaded/rank-{rank:05d}", marker)
            count_io(written=len(marker))
            put(None, f"{pointer}/checkpoint.json", json.dumps({"checkpoint": dest}).encode())
            if prune:
                prune()
        except BaseException as e:
            done.error = e
            raise
        finally:
            done.set()
        return ray.train.Checkpoint(pointer, fs)

    return upload


class _Upload(threading.Event):
    error: BaseException | None = None


_uploads: dict[str, _Upload] = {}


def wait_uploaded(dest: str, timeout: float | None = None) -> None:
    """Until this process's upload to `dest` is verified (raises what the upload raised)."""
    done = _uploads.setdefault(dest, _Upload())
    if not done.wait(timeout):
        raise TimeoutError(f"checkpoint upload to {dest} still running after {timeout} s")
    if done.error is not None:
        raise RuntimeError(f"checkpoint upload to {dest} failed: {done.error}") from done.error


def complete_steps(run_root: tuple[str, object]) -> list[int]:
    """The steps of this run whose checkpoint is complete in storage, oldest first."""
    return retrying(lambda: _complete_steps(run_root))


def _complete_steps(run_root: tuple[str, object]) -> list[int]:
    import pyarrow.fs as pafs

    root, fs = run_root[0], run_root[1] or pafs.LocalFileSystem()
    steps = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = info.base_name
        if info.type != pafs.FileType.Directory or not name.startswith("step-") or not name[5:].isdigit():
            continue
        try:
            with fs.open_input_stream(f"{info.path}/state.json") as f:
                world = int(json.loads(f.read())["world_size"])
        except FileNotFoundError:
            continue  # no state.json yet: rank 0's upload is unfinished
        except (ValueError, KeyError, TypeError):
            continue  # not ours
        # Any other OSError is the store failing (a 503, a dropped connection): it propagates to
        # complete_steps' retry. Read as "incomplete", it made a finished run look checkpoint-less.
        markers = fs.get_file_info(pafs.FileSelector(f"{info.path}/uploaded", allow_not_found=True))
        if {m.base_name for m in markers} >= {f"rank-{r:05d}" for r in range(world)}:
            steps.append(int(name[5:]))
    return sorted(steps)


def latest(run_root: tuple[str, object]) -> ray.train.Checkpoint | None:
    steps = complete_steps(run_root)
    return ray.train.Checkpoint(step_dir(run_root, steps[-1]), run_root[1]) if steps else None


def prune(run_root: tuple[str, object], keep: int) -> None:
    """Rank 0: delete the checkpoints older than the newest `keep` complete ones (an incomplete one
    older than those, from a crashed attempt, too); newer incomplete ones may still be uploading.
    Housekeeping: a store error is logged, and the next checkpoint or the run's end prunes again."""
    try:
        _prune(run_root, keep)
    except OSError as e:
        log.warning("pruning old checkpoints of %s failed: %s", run_root[0], e)


def _prune(run_root: tuple[str, object], keep: int) -> None:
    import pyarrow.fs as pafs

    steps = complete_steps(run_root)
    if len(steps) <= keep:
        return
    oldest_kept, fs = steps[-keep], run_root[1] or pafs.LocalFileSystem()
    listing = retrying(lambda: fs.get_file_info(pafs.FileSelector(run_root[0], allow_not_found=True)))
    for info in listing:
        name = info.base_name
        if name.startswith("step-") and name[5:].isdigit() and int(name[5:]) < oldest_kept:
            retrying(lambda: fs.delete_dir(info.path))


@contextlib.contextmanager
def local_copy(ckpt: ray.train.Checkpoint, attempts: int = 6, rank: int | None = None):
    """The checkpoint as a local folder: used in place if it is local, else downloaded with retries
    (a transient store error mid-download surfaces from pyarrow as an OSError, not retried by it).
    `rank`: only what that rank's engine loads, the shared files and its own ZeRO shards (DeepSpeed
    reads no other rank's), not every rank's: 1/N of the optimizer state on each of N workers."""
    import pyarrow.fs as pafs

    wanted = (lambda path: True) if rank is None else (lambda path: _rank_reads(path, rank))
    if isinstance(ckpt.filesystem, pafs.LocalFileSystem) and os.path.isdir(ckpt.path):
        count_io(read=dir_bytes(ckpt.path, wanted))
        yield ckpt.path
        return
    with tempfile.TemporaryDirectory(prefix="dbr-restore-") as tmp:
        def once():
            shutil.rmtree(tmp, ignore_errors=True)  # what a failed attempt left
            os.makedirs(tmp)
            if rank is None:
                ckpt.to_directory(tmp)
                return
            local = pafs.LocalFileSystem()
            for info in ckpt.filesystem.get_file_info(pafs.FileSelector(ckpt.path, recursive=True)):
                if info.type == pafs.FileType.File and wanted(info.base_name):
                    target = os.path.join(tmp, os.path.relpath(info.path, ckpt.path))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    pafs.copy_files(info.path, target, source_filesystem=ckpt.filesystem,
                                    destination_filesystem=local)

        retrying(once, attempts)
        count_io(read=dir_bytes(tmp))
        yield tmp


_SHARD = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")  # DeepSpeed's per-rank files (ZeRO optimizer; ZeRO-3 model)


def _rank_reads(name: str, rank: int) -> bool:
    shard = _SHARD.search(name)
    return shard is None or int(shard.group(1)) == rank


def restore(engine, run_root: tuple[str, object], lora: bool = False) -> int:
    """Load the run's latest complete checkpoint into `engine`; returns the step to continue from (0 if none)."""
    ckpt = latest(run_root)
    if ckpt is None:
        return 0
    ctx = ray.train.get_context()
    with local_copy(ckpt, rank=ctx.get_world_rank()) as d:  # data parallel only: the ZeRO rank is the world rank
        state = read_state(d)
        world = ctx.get_world_size()
        if state["world_size"] != world:
            raise RuntimeError(
                f"checkpoint at step {state['step']} was written by {state['world_size']} workers; "
                f"this run has {world}. ZeRO checkpoints only resume on the same worker count."
            )
        with weights_only():
            _, client = engine.load_checkpoint(d, tag=TAG, load_module_strict=not lora)
    return int(client["step"])


def read_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        return json.load(f)


def read_metrics(ckpt: ray.train.Checkpoint) -> dict:
    """The metrics saved with a checkpoint: its one small file, not the shards."""
    def once() -> bytes:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/metrics.json") as f:
            return f.read()

    try:
        data = retrying(once)
    except FileNotFoundError:
        return {}
    count_io(read=len(data))
    return json.loads(data)


def consolidated_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a (possibly ZeRO-sharded) checkpoint, on CPU, no GPUs needed."""
    root = os.path.join(ckpt_dir, TAG)
    with weights_only():
        if glob.glob(os.path.join(root, "*zero_pp_rank_*_optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=TAG)
        else:  # ZeRO stage 0: the module's own weights are in the model-states file
            sd = torch.load(os.path.join(root, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=True)["module"]
    return {k: v.float() for k, v in sd.items()}
