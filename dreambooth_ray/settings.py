"""What both the spec and storage stand on: the strict base of every spec section, where s3:// URLs
point, and which names may become storage path segments. spec.py reads subject manifests through
storage.py, and storage.py takes these from here, not from the spec, so neither imports the other.
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict

# A subject name becomes a storage path segment: letters, digits, '.', '_' and '-', no leading dot.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def check_name(name: str, what: str = "name") -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "start with a letter or digit and contain no '..' (it becomes a storage path)"
        )
    return name


class S3Settings(_Strict):
    """Where s3:// URLs point. Credentials come from the environment or the AWS config, never from here."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
