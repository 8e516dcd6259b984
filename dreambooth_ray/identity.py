"""A subject's run identity: the settings that shape its trained weights, and the names of its base and
SR training runs made from them. Its own small module: naming a run takes the spec alone, not job.py
(which imports Ray and every stage).
"""

from __future__ import annotations

from . import images
from .spec import JobSpec, Subject

# Settings that change neither the trained weights nor which checkpoint may resume: cadence, retries,
# placement, speed switches that compute the same step, and gradient checkpointing (the same step,
# recomputed: a run that ran out of memory resumes with it on).
# The export's precision and formats are not either: the trained weights are the same.
# masked_loss: what it trains is the masks, which subject_identity names (auto and on train the same).
# pack: a packed subject trains what its solo run trains (tests/test_pack.py); the pack's checkpoints are
# under a run of its own (job.pack_name), so packing or not never resumes the other's checkpoint.
_NOT_IDENTITY = {"masked_loss", "pack", "checkpoint_every", "checkpoint_upload", "keep_checkpoints", "max_failures", "use_gpu",
                 "attention", "channels_last", "compile", "export_dtype", "export_formats", "gradient_checkpointing"}


# Settings added after runs were named, with the value that trains what runs did before them: left out
# of the identity at that value, so a run started before the setting existed keeps its name and resumes
# after an upgrade. (lr_scheduler's default is today's schedule only without warmup: warmup's formula
# became diffusers' with it, so a run with warmup is another run.)
_LATER = {"lr_num_cycles": 1, "lr_power": 1.0, "optimizer": "adamw", "weight_decay": 1e-2, "snr_gamma": None,
          "noise_offset": 0.0}


def train_identity(cfg) -> dict:
    """A stage's effective training settings, as far as they shape the run."""
    t = cfg.model_dump(exclude=_NOT_IDENTITY)
    for k, neutral in _LATER.items():
        if k in t and t[k] == neutral:
            del t[k]
    if t.get("lr_scheduler") == "constant_with_warmup" and not t.get("lr_warmup_steps"):
        del t["lr_scheduler"]
    if cfg.method != "lora":
        t.pop("lora")
    return t


def subject_identity(spec: JobSpec, subject: Subject) -> dict:
    ident = subject.model_dump(by_alias=True)
    if subject.identifier == "auto":  # resolved from the vocabulary window and the seed
        ident["identifiers"] = spec.identifiers.model_dump()
    ident["skip_bad_images"] = spec.skip_bad_images  # which photos are trained on
    # Masks and captions beside the photos, by content: adding or editing one is a new run.
    side = images.side_files(subject.images, spec.s3)
    if "masks" in side and spec.train.masked_loss != "off":
        ident["masks"] = side["masks"][1]
    if "captions" in side:
        ident["captions"] = side["captions"][1]
    return ident


def run_name(spec: JobSpec, subject: Subject, model_identity: str, prior_key: str | None) -> str:
    """The base stage's run: a changed setting is a new run, never a resume or a skip of another one."""
    prior = spec.prior.model_dump(include={"enabled", "num_class_images", "loss_weight"})
    key = spec.fingerprint(model_identity, subject_identity(spec, subject), prior, prior_key,
                           train_identity(spec.train))
    return f"{subject.name}-{key}"


def sr_run_name(spec: JobSpec, subject: Subject, sr_identity: str, prior_key: str | None) -> str:
    # The SR stage learns from the subject's photos alone, not from the base stage's weights, with the
    # settings it inherits from `train` (workers, precision, accumulation, seed, flips) resolved.
    sr = spec.sr.model_dump(include={"noise_aug", "prior_preservation", "prior_loss_weight"})
    sr["input_resolution"] = spec.sr.input_resolution or spec.train.resolution
    key = spec.fingerprint(sr_identity, subject_identity(spec, subject), sr, prior_key,
                           train_identity(spec.stage_train("sr")))
    return f"{subject.name}-sr-{key}"
