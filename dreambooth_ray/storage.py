"""Object storage: one fsspec filesystem for our files, one pyarrow filesystem for Ray Train.

Everything the job writes lives under the storage root; path parts are validated names, so a
user-supplied name can never climb out of its prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs as pafs

from .errors import UserError
from .settings import S3Settings, check_name


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def filesystem(url: str, s3: S3Settings | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `url` and the path inside it. s3:// uses the job's endpoint."""
    options: dict[str, Any] = {}
    if url.startswith(("s3://", "s3a://")) and s3 is not None:
        client = {k: v for k, v in (("endpoint_url", s3.endpoint_url), ("region_name", s3.region)) if v}
        if client:
            options["client_kwargs"] = client
        # Other processes (actors, workers) write here all the time: never trust a cached listing,
        # and never reuse a cached instance that may outlive a restarted endpoint.
        options.update(skip_instance_cache=True, use_listings_cache=False)
        options.setdefault("config_kwargs", {"retries": {"max_attempts": 8, "mode": "standard"}})
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/")


# Bytes this process moved through storage (Storage, checkpoint shards, photos): the per-subject
# timeline reports the difference over the work a process did for one subject.
_IO = {"written": 0, "read": 0}
_IO_LOCK = threading.Lock()  # checkpoint uploads count from background threads


def count_io(written: int = 0, read: int = 0) -> None:
    with _IO_LOCK:
        _IO["written"] += written
        _IO["read"] += read


def io_counts() -> tuple[int, int]:
    """(bytes written, bytes read) by this process so far."""
    with _IO_LOCK:
        return _IO["written"], _IO["read"]


def dir_bytes(path: str, wanted=lambda name: True) -> int:
    """The size of the files under `path` whose names are `wanted`."""
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names if wanted(n))


@dataclass
class Storage:
    """The job's storage root (a local folder or s3://bucket/prefix)."""

    root: str
    s3: S3Settings | None = None

    def __post_init__(self):
        self.root = self.root.rstrip("/")
        self.fs, self.base = filesystem(self.root, self.s3)
        self.protocol = "s3" if self.root.startswith(("s3://", "s3a://")) else "file"

    def path(self, *parts: str) -> str:
        for p in parts:
            for seg in p.split("/"):
                check_name(seg, "storage path segment")
        return "/".join([self.base, *parts])

    def url(self, *parts: str) -> str:
        p = self.path(*parts)
        return f"s3://{p}" if self.protocol == "s3" else p

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_json(self, *parts: str) -> Any | None:
        data = self.read_bytes(*parts)
        return None if data is None else json.loads(data)

    def read_bytes(self, *parts: str) -> bytes | None:
        try:
            data = self.fs.cat_file(self.path(*parts))
        except FileNotFoundError:
            return None
        count_io(read=len(data))
        return data

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write so that a reader never sees a partial file: S3 puts are atomic, local files are renamed."""
        dest = self.path(*parts)
        count_io(written=len(data))
        if self.protocol == "s3":
            self.fs.pipe_file(dest, data)
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)

    def put_file(self, local: str, *parts: str) -> None:
        """A local file into storage without reading it into memory (a multi-GB checkpoint); atomic as
        write_bytes is."""
        dest = self.path(*parts)
        count_io(written=os.path.getsize(local))
        if self.protocol == "s3":
            self.fs.put_file(local, dest)
            return
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.{uuid.uuid4().hex}.tmp"
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def listdir(self, *parts: str) -> list[str]:
        try:
            return sorted(os.path.basename(p.rstrip("/")) for p in self.fs.ls(self.path(*parts), detail=False))
        except FileNotFoundError:
            return []

    def put_dir(self, local_dir: str, *parts: str) -> None:
        dest = self.path(*parts)
        if self.fs.exists(dest):
            self.fs.rm(dest, recursive=True)
        if self.protocol == "file":
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        self.fs.put(local_dir.rstrip("/") + "/", dest, recursive=True)
        count_io(written=dir_bytes(local_dir))

    def check_writable(self) -> None:
        """Fail before any compute if the root is missing or not writable (no bucket, no permission)."""
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            if self.protocol == "file":
                os.makedirs(self.base, exist_ok=True)
            self.fs.pipe_file(f"{self.base}/{probe}", b"ok")
            self.fs.rm_file(f"{self.base}/{probe}")
        except Exception as e:  # the storage library's own errors vary by backend
            raise StorageError(f"storage {self.root!r} is not writable: {type(e).__name__}: {e}") from None

    def ray_storage(self, *parts: str) -> tuple[str, Any]:
        """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
        path = self.path(*parts)
        if self.protocol == "file":
            return path, None
        kwargs: dict[str, Any] = {}
        if self.s3 and self.s3.endpoint_url:
            scheme, _, host = self.s3.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        if self.s3 and self.s3.region:
            kwargs["region"] = self.s3.region
        # retry_strategy: transient 5xx/timeouts from the store are retried, not fatal.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=8)
        return path, S3(**kwargs)


class S3(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, pickled with the settings it was made with. pyarrow's own pickling
    drops `retry_strategy`, and Ray pickles the run's filesystem to its controller and workers: there
    Ray's own writes (its checkpoint manager's snapshot) got pyarrow's default 3 attempts, and one
    throttled CompleteMultipartUpload failed a subject's run. The settings hold no credentials (those
    come from each process's environment)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._settings = kwargs

    def __reduce__(self):
        return _s3, (self._settings,)


def _s3(settings: dict) -> S3:
    return S3(**settings)


class StorageError(UserError, RuntimeError):
    """Storage that cannot be used (missing bucket, no permission, a name escaping its prefix)."""
