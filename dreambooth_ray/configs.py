"""A model's config files, read without its weights (model_index.json, each part's config.json), for
the checks and plans made before any compute: the preflight and the memory plan both read them here.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from . import models, tiny
from .errors import UserError
from .settings import S3Settings
from .storage import filesystem, is_remote


class PreflightError(UserError, ValueError):
    """A job that would fail on every attempt; the message lists each cause, one per line."""


class ModelConfigs:
    """A model's config files, read without its weights: built-in, local folder, s3:// or hub id."""

    def __init__(self, ref: str, s3: S3Settings | None, field: str):
        self.ref, self.s3, self.field = ref, s3, field
        self.root = str(tiny.materialize(models.cache_root(), ref)) if ref in tiny.BUILT_IN else ref

    def read(self, relpath: str) -> dict | None:
        """The JSON file, or None if the model has no such file."""
        try:
            if is_remote(self.root):
                fs, root = filesystem(self.root, self.s3)
                return json.loads(fs.cat_file(posixpath.join(root, relpath)))
            if Path(self.root).exists():
                return json.loads((Path(self.root) / relpath).read_text())
            from huggingface_hub import hf_hub_download  # a hub id: configs only, never weights

            return json.loads(Path(hf_hub_download(self.root, relpath)).read_text())
        except FileNotFoundError:
            return None
        except Exception as e:  # unreachable hub, no permission, not JSON: nothing after this can load it
            if "EntryNotFound" in type(e).__name__:
                return None
            raise PreflightError(f"{self.field}: cannot read {relpath} of {self.ref!r} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None


def model_index(cfgs: ModelConfigs) -> dict:
    index = cfgs.read("model_index.json")
    if index is None:
        raise PreflightError(f"{cfgs.field}: {cfgs.ref!r} has no model_index.json (not a diffusers pipeline)")
    return index
