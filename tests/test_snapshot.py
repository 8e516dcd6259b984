"""Checkpoint files on a local filesystem are written around the page cache (snapshot.DirectFile),
large tensors straight from an async checkpoint's host buffers (placed for it by SnapshotWriter)."""

import ctypes
import mmap
import os
import sys
import types

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from dreambooth_ray.snapshot import DirectFile, SnapshotWriter, stream_to


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


def resident_memory(t: torch.Tensor) -> float:
    """The share of a CPU tensor's pages that are mapped (mincore), read without touching them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    size = t.data_ptr() + t.nbytes - start
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    assert libc.mincore(ctypes.c_void_p(start), size, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / len(vec)


def direct_or_skip(path: str, **kw) -> DirectFile:
    out = DirectFile.open(pafs.LocalFileSystem(), path)
    if out is None:
        pytest.skip(f"{os.path.dirname(path)}'s filesystem refuses O_DIRECT")
    if kw:
        out.close()
        out = DirectFile(path, **kw)
    return out


@pytest.fixture(autouse=True)
def direct_writes_not_refused(monkeypatch):
    # One test's refused write must not turn the next test's direct writes into skips.
    monkeypatch.setattr(DirectFile, "refused", False)


@pytest.fixture
def os_writes(monkeypatch):
    """The memory each os.write call in this process sends from, as (address, length): the real call."""
    sent, real = [], os.write

    def write(fd, data):
        with memoryview(data) as view:
            sent.append((np.frombuffer(view, np.uint8).ctypes.data, view.nbytes))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return sent


def sent_from(sent, address: int, nbytes: int) -> int:
    """The bytes os.write sent straight from [address, address + nbytes)."""
    return sum(n for a, n in sent if address <= a and a + n <= address + nbytes)


def test_direct_file_stores_exactly_the_bytes_written(tmp_path, os_writes):
    # A small buffer: writes larger than it, ones that end mid-buffer, a tail that is no whole block;
    # large ones from memory whose address agrees with the file position (mod ALIGN), sent from there,
    # and large ones from memory that does not, copied.
    rng = np.random.default_rng(0)
    regions = [mmap.mmap(-1, 8 << 20) for _ in range(2)]  # placed, not placed
    bases = []
    for region in regions:
        memory = np.frombuffer(region, np.uint8)
        memory[:] = rng.integers(0, 256, len(memory), dtype=np.uint8)
        bases.append(memory.ctypes.data)  # page-aligned
        del memory
    small = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 4095, 8192, 10000, 3, 20000, 777)]
    big = 3 << 19  # 1.5 MB, above DIRECT_FROM
    path = str(tmp_path / "f.bin")
    expected, placed = [], []
    with direct_or_skip(path, buffer=8192) as out:
        for i, c in enumerate(small):
            for view in (memoryview(c), None):
                if view is None:  # a large write after each small one, alternately placed and not
                    at = out.tell() % DirectFile.ALIGN + (i % 3) * DirectFile.ALIGN + (i % 2) * 64
                    view = memoryview(regions[i % 2])[at:at + big]
                    if i % 2 == 0:
                        placed.append((bases[0] + at, big))
                assert out.write(view) == view.nbytes
                expected.append(bytes(view))
                view.release()
        assert out.tell() == sum(map(len, expected))
    with open(path, "rb") as f:
        assert f.read() == b"".join(expected)
    for address, n in placed:  # all but the blocks it shares with its neighbours
        assert sent_from(os_writes, address, n) >= n - 2 * DirectFile.ALIGN
    assert sent_from(os_writes, bases[1], 8 << 20) == 0
    for region in regions:
        region.close()


def test_an_async_checkpoints_large_tensors_are_written_from_its_host_buffers(tmp_path, os_writes):
    """SnapshotWriter places each large host buffer where its file position needs it, so the file is
    written from the buffers themselves, not copied once more: at the first checkpoint, after the
    pickled part grew (every position moved), and without moving buffers that are right already."""
    direct_or_skip(str(tmp_path / "probe")).close()
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    local, store = tmp_path / "local", tmp_path / "store"
    # Zip serialization, as DeepSpeed configures its engine by default.
    inner = TorchCheckpointEngine(types.SimpleNamespace(checkpoint_config={"checkpoint_serialization": True}))
    assert inner.zipfile_serialization
    writes = SnapshotWriter()
    live = {"w": torch.randn(1 << 20), "b": torch.randn(600_000).to(torch.bfloat16).view(1200, 500),
            "bias": torch.randn(10), "step": 0, "note": ""}
    addresses = []
    for step, note in ((1, ""), (2, "x" * 1000), (3, "y" * 1000)):
        live["step"], live["note"] = step, note
        for t in ("w", "b", "bias"):
            live[t].add_(1)
        writes.begin(inner, str(local), str(store / str(step)), None)
        os_writes.clear()
        writes.save(live, str(local / "state.pt"))
        writes.settle()
        assert writes.waiter()() == (store / str(step) / "state.pt").stat().st_size
        big = {k: b for k, b in writes._buffers.items() if b.nbytes >= DirectFile.DIRECT_FROM}
        assert len(big) == 2
        for b in big.values():
            assert sent_from(os_writes, b.data_ptr(), b.nbytes) >= b.nbytes - 2 * DirectFile.ALIGN
        addresses.append(sorted(b.data_ptr() for b in big.values()))
        saved = torch.load(store / str(step) / "state.pt")
        assert saved["step"] == step and saved["note"] == note
        assert all(torch.equal(saved[t], live[t]) and saved[t].dtype == live[t].dtype for t in ("w", "b", "bias"))
    assert addresses[2] == addresses[1] != addresses[0]  # moved once, when the layout changed
    writes.close()


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


def test_buffers_for_a_store_not_written_direct_stay_where_they_are(tmp_path):
    """Placing buffers pays only for a direct local write: for any other store (S3 in production; here a
    filesystem wrapper, which DirectFile does not take) a layout change moves nothing to fresh pages."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    (tmp_path / "store").mkdir()
    fs = pafs.SubTreeFileSystem(str(tmp_path / "store"), pafs.LocalFileSystem())
    inner = TorchCheckpointEngine(types.SimpleNamespace(checkpoint_config={"checkpoint_serialization": True}))
    writes = SnapshotWriter()
    live = {"w": torch.randn(1 << 20), "note": ""}
    addresses = []
    for step, note in ((1, ""), (2, "x" * 1000)):
        live["note"] = note
        writes.begin(inner, str(tmp_path / "local"), str(step), fs)
        writes.save(live, str(tmp_path / "local" / "state.pt"))
        writes.settle()
        writes.waiter()()
        addresses.append(writes._buffers["state.pt/w"].data_ptr())
        saved = torch.load(tmp_path / "store" / str(step) / "state.pt")
        assert saved["note"] == note and torch.equal(saved["w"], live["w"])
    assert addresses[0] == addresses[1]
    writes.close()


@pytest.mark.parametrize("direct", [True, False], ids=["local-direct", "other-store"])
def test_a_planned_checkpoint_maps_its_buffers_and_the_checkpoint_fills_them_in_place(tmp_path, direct):
    """A plan (`begin(dest=None)`) allocates the host buffers, placed for a direct write where it is one,
    and maps their pages, writing nothing; the checkpoint after it copies into those same buffers."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if direct:
        direct_or_skip(str(tmp_path / "probe")).close()
    (tmp_path / "store").mkdir()
    fs = pafs.LocalFileSystem() if direct else pafs.SubTreeFileSystem(str(tmp_path / "store"), pafs.LocalFileSystem())
    dest = str(tmp_path / "store" / "1") if direct else "1"
    inner = TorchCheckpointEngine(types.SimpleNamespace(checkpoint_config={"checkpoint_serialization": True}))
    # 64 MB each: above glibc's largest mmap threshold, so each buffer is memory never touched before.
    live = {"w": torch.randn(16 << 20), "m": torch.randn(16 << 20).to(torch.bfloat16).view(4096, -1), "step": 3}
    writes = SnapshotWriter()
    writes.begin(inner, str(tmp_path / "local"), None, fs)
    writes.save(live, str(tmp_path / "local" / "state.pt"))
    writes.end_plan()
    planned = {k: (b.data_ptr(), resident_memory(b)) for k, b in writes._buffers.items()}
    assert sorted(planned) == ["state.pt/m", "state.pt/w"]
    assert all(mapped == 1.0 for _, mapped in planned.values()), planned  # without the plan: 0.0
    assert not any((tmp_path / "store").iterdir()) and not (tmp_path / "local").exists()

    writes.begin(inner, str(tmp_path / "local"), dest, fs)
    writes.save(live, str(tmp_path / "local" / "state.pt"))
    writes.settle()
    assert writes.waiter()() == (tmp_path / "store" / "1" / "state.pt").stat().st_size
    assert {k: b.data_ptr() for k, b in writes._buffers.items()} == {k: p for k, (p, _) in planned.items()}
    saved = torch.load(tmp_path / "store" / "1" / "state.pt")
    assert saved["step"] == 3 and all(torch.equal(saved[k], live[k]) for k in ("w", "m"))
    writes.close()
