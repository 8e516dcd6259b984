"""The `gpu` marker: such tests are skipped, before any fixture runs (no Ray cluster, no model), where
torch sees no CUDA device. `make gpu-check` runs them on one GPU.

This folder is a package (it has an __init__.py) on purpose: without one, pytest would import this
file as a second top-level `conftest` module, evicting tests/conftest.py from sys.modules, and every
`from conftest import tiny_spec` in the suite would then fail to import.

The hook sees every collected test, so a `gpu` test anywhere in a run that includes tests/gpu is
skipped the same way; torch is imported only when some collected test carries the marker.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def cuda_missing() -> str | None:
    """Why GPU tests cannot run here, or None when a CUDA device is visible."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return f"no CUDA: torch {torch.__version__} is a CPU-only build"
    return f"no CUDA device visible to torch {torch.__version__} (CUDA {torch.version.cuda})"


def pytest_collection_modifyitems(config, items):
    marked = [item for item in items if item.get_closest_marker("gpu")]
    if not marked:
        return
    reason = cuda_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test: {reason} (run `make gpu-check` on a GPU machine)")
    for item in marked:
        item.add_marker(skip)
