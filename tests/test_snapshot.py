"""Checkpoint files on a local filesystem are written around the page cache (snapshot.DirectFile)."""

import ctypes
import mmap
import os
import sys

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from dreambooth_ray.snapshot import DirectFile, stream_to


def resident_fraction(path: str) -> float:
    """The share of `path`'s pages in the page cache (mincore), read without touching them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages


def direct_or_skip(path: str, **kw) -> DirectFile:
    out = DirectFile.open(pafs.LocalFileSystem(), path)
    if out is None:
        pytest.skip(f"{os.path.dirname(path)}'s filesystem refuses O_DIRECT")
    if kw:
        out.close()
        out = DirectFile(path, **kw)
    return out


def test_direct_file_stores_exactly_the_bytes_written(tmp_path):
    # A small buffer: writes larger than it, ones that end mid-buffer, and a tail that is no whole block.
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 4095, 8192, 10000, 3, 20000, 777)]
    path = str(tmp_path / "f.bin")
    with direct_or_skip(path, buffer=8192) as out:
        for c in chunks:
            assert out.write(memoryview(c)) == len(c)
        assert out.tell() == sum(map(len, chunks))
    with open(path, "rb") as f:
        assert f.read() == b"".join(chunks)


@pytest.mark.skipif(sys.platform != "linux", reason="mincore and O_DIRECT as Linux has them")
def test_a_local_checkpoint_file_bypasses_the_page_cache(tmp_path):
    direct_or_skip(str(tmp_path / "probe")).close()
    state = {"w": torch.randn(6 << 20), "step": 7}  # 24 MB
    buffered = str(tmp_path / "buffered.pt")
    torch.save(state, buffered)
    if resident_fraction(buffered) < 0.9:
        pytest.skip("this machine evicts a fresh buffered write at once: mincore cannot tell the two apart")

    target = str(tmp_path / "ckpt" / "shard.pt")
    os.makedirs(os.path.dirname(target))
    stored = stream_to(pafs.LocalFileSystem(), target, state, zipfile=True)
    # Measured here: 1.0 of a buffered write's pages are cached (checked above), 0.0 of this one's.
    assert resident_fraction(target) < 0.05
    assert stored == os.path.getsize(target)
    back = torch.load(target)
    assert back["step"] == 7 and torch.equal(back["w"], state["w"])


def test_a_filesystem_refusing_direct_writes_gets_the_file_buffered(tmp_path, monkeypatch):
    direct_or_skip(str(tmp_path / "probe")).close()
    # The kernel refuses an O_DIRECT write of a length that is no multiple of the block size (EINVAL),
    # as a filesystem that opens O_DIRECT and cannot write it does.
    monkeypatch.setattr(DirectFile, "ALIGN", 100)
    monkeypatch.setattr(DirectFile, "refused", False)
    state = {"w": torch.randn(1000)}
    target = str(tmp_path / "shard.pt")
    assert stream_to(pafs.LocalFileSystem(), target, state, zipfile=True) == os.path.getsize(target)
    assert DirectFile.refused and DirectFile.open(pafs.LocalFileSystem(), str(tmp_path / "next")) is None
    assert resident_fraction(target) > 0.9  # written buffered, the second time (before a read caches it)
    assert torch.equal(torch.load(target)["w"], state["w"])
