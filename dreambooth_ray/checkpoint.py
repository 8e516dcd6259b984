"""DeepSpeed checkpoints through Ray Train: every rank saves its shard, Ray merges and uploads them.

Ray registers a checkpoint only after every rank's upload finished, so a half-written checkpoint is
never offered for resume; `state.json` records the step that the checkpoint holds.

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
import os
import shutil
import tempfile
import threading

import ray.train
import torch

from .storage import count_io, dir_bytes

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


def save(engine, step: int, metrics: dict, started_at: int, run_root: tuple[str, object], lora: bool = False,
         upload: str = "async") -> None:
    """Called by every rank: write this rank's shard locally and report it (Ray merges the directories).

    `upload="async"`: training goes on while a background thread uploads the shard; Ray registers
    the checkpoint (and may resume from it) only after every rank's upload finished and was verified,
    and deletes the local copy then. With LoRA only the adapters (the trainable parameters) are saved.
    """
    from ray.train import CheckpointUploadMode

    tmp = tempfile.mkdtemp(prefix="dbr-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=TAG, client_state={"step": step}, exclude_frozen_parameters=lora)
        if ray.train.get_context().get_world_rank() == 0:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                # started_at: the step this attempt began from (non-zero after a resume).
                json.dump({"step": step, "started_at": started_at,
                           "world_size": ray.train.get_context().get_world_size()}, f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    count_io(written=dir_bytes(tmp))  # what goes up, now or in the background
    ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{step:07d}",
        checkpoint_upload_fn=verified_upload(*run_root),
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC if upload == "async" else CheckpointUploadMode.SYNC,
        delete_local_checkpoint_after_upload=True,
    )


def verified_upload(root: str, fs, attempts: int = 6, streams: int = 8):
    """A checkpoint upload that fails loudly and retries, in place of Ray's default copy.

    Ray's default (pyarrow copy_files) can drop an S3 multipart-upload error on the floor ("Error
    ignored when destroying file") and register a checkpoint with a missing file. Here each file is
    streamed with an explicit close (which raises), its stored size is checked, and a failed file is
    retried with backoff; only then does Ray register the checkpoint. Files go up `streams` at a time
    (a large file is itself a multipart upload with parallel parts in pyarrow's S3 stream).
    """
    import time
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()

    def put(src: str, target: str) -> None:
        size = os.path.getsize(src)
        for attempt in range(attempts):
            try:
                fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                with open(src, "rb") as f, fs.open_output_stream(target) as out:
                    shutil.copyfileobj(f, out, 8 << 20)
                stored = fs.get_file_info(target).size
                if stored != size:
                    raise OSError(f"{target}: stored {stored} bytes of {size}")
                return
            except OSError:
                if attempt == attempts - 1:
                    raise
                time.sleep(min(0.5 * 2**attempt, 8))

    def upload(ckpt: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        dest = f"{root}/{dir_name}"
        files = [os.path.join(d, n) for d, _, names in os.walk(ckpt.path) for n in names]
        with ThreadPoolExecutor(streams) as pool:
            for done in [pool.submit(put, src, f"{dest}/{os.path.relpath(src, ckpt.path)}") for src in files]:
                done.result()  # the first failure raises: Ray then registers nothing
        uploaded(dir_name).set()
        return ray.train.Checkpoint(dest, fs)

    return upload


_uploaded: dict[str, threading.Event] = {}


def uploaded(dir_name: str) -> threading.Event:
    """Set once this process has uploaded and verified its part of checkpoint `dir_name`."""
    return _uploaded.setdefault(dir_name, threading.Event())


@contextlib.contextmanager
def local_copy(ckpt: ray.train.Checkpoint, attempts: int = 6):
    """The checkpoint as a local folder: used in place if it is local, else downloaded with retries
    (a transient store error mid-download surfaces from pyarrow as an OSError, not retried by it)."""
    import time

    import pyarrow.fs as pafs

    if isinstance(ckpt.filesystem, pafs.LocalFileSystem) and os.path.isdir(ckpt.path):
        count_io(read=dir_bytes(ckpt.path))
        yield ckpt.path
        return
    with tempfile.TemporaryDirectory(prefix="dbr-restore-") as tmp:
        for attempt in range(attempts):
            try:
                ckpt.to_directory(tmp)
                break
            except OSError:
                if attempt == attempts - 1:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                time.sleep(min(0.5 * 2**attempt, 8))
        count_io(read=dir_bytes(tmp))
        yield tmp


def restore(engine, lora: bool = False) -> int:
    """Load the latest reported checkpoint into `engine`; returns the step to continue from (0 if none)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with local_copy(ckpt) as d:
        state = read_state(d)
        world = ray.train.get_context().get_world_size()
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
