"""DeepSpeed checkpoints through Ray Train: every rank saves its shard, Ray merges and uploads them.

Ray registers a checkpoint only after every rank's upload finished, so a half-written checkpoint is
never offered for resume; `state.json` records the step that the checkpoint holds.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import ray.train
import torch

TAG = "ckpt"  # one DeepSpeed tag per Ray checkpoint directory


def save(engine, step: int, metrics: dict, started_at: int) -> None:
    """Called by every rank: write this rank's shard and report it (Ray merges the directories)."""
    tmp = tempfile.mkdtemp(prefix="dbr-ckpt-")
    try:
        engine.save_checkpoint(tmp, tag=TAG, client_state={"step": step})
        if ray.train.get_context().get_world_rank() == 0:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                # started_at: the step this attempt began from (non-zero after a resume).
                json.dump({"step": step, "started_at": started_at,
                           "world_size": ray.train.get_context().get_world_size()}, f)
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{step:07d}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(engine) -> int:
    """Load the latest reported checkpoint into `engine`; returns the step to continue from (0 if none)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        state = read_state(d)
        world = ray.train.get_context().get_world_size()
        if state["world_size"] != world:
            raise RuntimeError(
                f"checkpoint at step {state['step']} was written by {state['world_size']} workers; "
                f"this run has {world}. ZeRO checkpoints only resume on the same worker count."
            )
        _, client = engine.load_checkpoint(d, tag=TAG)
    return int(client["step"])


def read_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        return json.load(f)


def consolidated_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a (possibly ZeRO-sharded) checkpoint, on CPU, no GPUs needed."""
    root = os.path.join(ckpt_dir, TAG)
    if glob.glob(os.path.join(root, "*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=TAG)
    else:  # ZeRO stage 0: the module's own weights are in the model-states file
        sd = torch.load(os.path.join(root, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}
