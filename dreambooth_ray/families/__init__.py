"""Model families: what differs between Stable Diffusion, DeepFloyd IF, SDXL, SD3, Flux and the x4 upscaler,
one module each behind `base.Family`; the stages (priors, train, SR, export, samples, eval) take a
family and never ask which model they hold.

A family is recognised from model_index.json's `_class_name` (`family_for`); `models.family` reads it
from a built-in, local, s3:// or hub model (models.py imports this package, never the reverse). An
architecture with no family is refused (preflight) before any compute, with the list of supported ones.
"""

from __future__ import annotations

from .base import REGISTERED, Family, UnsupportedModel
from .flux import FLUX
from .if_ import IF_STAGE_I, IF_STAGE_II
from .sd import SD, X4
from .sd3 import SD3
from .sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SD, IF_STAGE_I, SDXL, SD3, FLUX, IF_STAGE_II, X4)
REGISTERED.extend(FAMILIES)  # what a pickled family is looked up in (base._lookup)
BY_PIPELINE = {f.pipeline: f for f in FAMILIES}


def supported(role: str = "base") -> dict[str, str]:
    """{pipeline class: description} of the families of one role ('base' or 'sr')."""
    return {f.pipeline: f.title for f in FAMILIES if f.role == role}


def supported_line(role: str = "base") -> str:
    return ", ".join(f"{k} ({v})" for k, v in supported(role).items())


def family_for(model_index: dict, role: str | None = None) -> Family:
    """The family of a pipeline, from its model_index.json; `role` restricts to base or SR families."""
    kind = model_index.get("_class_name")
    fam = BY_PIPELINE.get(kind)
    if fam is None or (role is not None and fam.role != role):
        what = "SR models" if role == "sr" else "base models"
        raise UnsupportedModel(f"a {kind} is not supported; supported {what}: {supported_line(role or 'base')}")
    return fam


def for_path(path: str, role: str | None = None) -> Family:
    """The family of a resolved model folder (or hub id)."""
    from diffusers import DiffusionPipeline

    return family_for(DiffusionPipeline.load_config(path), role)


__all__ = ["Family", "UnsupportedModel", "FAMILIES", "SD", "IF_STAGE_I", "SDXL", "SD3", "FLUX", "IF_STAGE_II", "X4",
           "family_for", "for_path", "supported", "supported_line"]
