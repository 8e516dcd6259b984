"""A benchmark's result: the whole of it to its JSON file, its headline (less the bulky keys) to stdout."""

from __future__ import annotations

import json
from pathlib import Path


def write(path: str | Path, result: dict, bulky: tuple[str, ...] = ("runs",)) -> dict:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in bulky}))
    return result
