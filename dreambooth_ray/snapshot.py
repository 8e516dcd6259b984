"""An async checkpoint's host copy of a training engine's state, streamed to storage by a thread
(checkpoint.py registers and verifies it), and the checked file writes both kinds of checkpoint use
(`store_file`; on a local filesystem around the page cache). Free of Ray: the training step
(engine.py) waits here for the copy before its optimizer update."""

from __future__ import annotations

import copy
import errno
import mmap
import os
import time
import weakref

import numpy as np
import torch


class SnapshotWriter:
    """DeepSpeed's checkpoint engine for async checkpoints, one per training engine: `save` copies the
    state into host buffers and a thread streams each file from them to the checkpoint's folder in
    storage (retried as a whole on a store error; its stored size checked). A checkpoint's `waiter()`
    returns the bytes sent once every file is stored, and raises what a write raised.

    State on the CPU is copied by a second thread while the next step's forward and backward run
    (they read the saved tensors, never write them): `settle()` waits for the copy, and the optimizer
    step, which changes them in place, must call it first (Engine.step does). The copy of 2.2 GB took
    ~1 s of a training worker's step on this 2-CPU machine, most of an async checkpoint's stall.
    State on a GPU is copied to pinned buffers before `save` returns (fast, and ordered with the
    device's streams without cross-thread care).

    The buffers are kept and refilled at the next checkpoint, which first waits for this one's files:
    a copy into memory already mapped runs ~5x faster here than one into fresh pages (0.15 s against
    0.84 s for 2.2 GB on 2 idle CPUs), at the cost of one checkpoint's worth of host memory. For a
    local file, large buffers move (once, to fresh pages) when their positions in it do (`_place`).
    `begin(..., dest=None)` plans a checkpoint instead of writing one: its `save`s allocate and touch
    the buffers (checkpoint.prepare, after the first optimizer step), not the copy beside the first
    checkpoint's next step. A subject's end keeps them for the next engine in the process (a training
    lane's next subject; `release`)."""

    def __init__(self, buffers: dict | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self._pool, self._buffers, self._writes, self.inner = ThreadPoolExecutor(1, thread_name_prefix="dbr-ckpt"), buffers or {}, [], None
        self._copier, self._copies = ThreadPoolExecutor(1, thread_name_prefix="dbr-ckpt-copy"), []

    def begin(self, inner, local_root: str, dest: str | None, fs, stale_marker: str | None = None) -> "SnapshotWriter":
        """A checkpoint whose DeepSpeed paths are under `local_root`; its files go to `dest` on `fs`,
        after `stale_marker` is deleted there. `dest=None`: a plan (the class's docstring)."""
        import pyarrow.fs as pafs

        for w in self._writes:  # the last checkpoint's writes still read the buffers (its upload sees any error)
            w.exception()
        self.inner, self._writes, self._copies, self._first = inner, [], [], None
        self._local_root, self._dest, self._fs = local_root, dest, fs or pafs.LocalFileSystem()
        if dest is None:  # what the plan leaves unused (a previous subject's other model) goes
            self._unplanned, self._mapped = set(self._buffers), {b.data_ptr() for b in self._buffers.values()}
        if stale_marker:  # first (one thread: in order); no file is written if it fails
            self._first = self._pool.submit(lambda fs=self._fs: delete_file(fs, stale_marker) or 0)
            self._writes.append(self._first)
        return self

    def __getattr__(self, name):  # loading, folders, commit: DeepSpeed's own engine
        return getattr(self.inner, name)

    def preserves_storage_sharing(self) -> bool:
        return False  # the host copy is compact already: DeepSpeed need not clone views first

    def save(self, state_dict, path: str) -> None:
        zipfile = getattr(self.inner, "zipfile_serialization", True)  # as DeepSpeed's own engine writes
        target = f"{self._dest}/{os.path.relpath(path, self._local_root)}"
        pairs = []  # (host buffer, live tensor)
        host = self._plan(state_dict, os.path.basename(path), pairs)
        if DirectFile.takes(self._fs):  # here, not beside the next step: it holds the GIL, which the step needs
            _place(host, zipfile, pairs)
        if self._dest is None:
            for buf, _ in pairs:
                if buf.data_ptr() not in self._mapped and not buf.is_pinned():  # pinned memory is resident
                    _touch(buf)
            return
        if any(src.is_cuda for _, src in pairs):
            copied = None
            _fill(pairs)
        else:
            copied = self._copier.submit(_fill, pairs)
            self._copies.append(copied)
        # The copy first: a write that fails on the marker must still not let the next checkpoint
        # refill buffers being copied into.
        self._writes.append(self._pool.submit(stream_to, self._fs, target, host, zipfile,
                                              after=(copied, self._first)))

    def settle(self) -> float:
        """Waits until the live tensors of the checkpoint being written may change; returns the seconds waited."""
        t0 = time.perf_counter()
        for c in self._copies:
            c.exception()  # a failed copy fails its file's write, which the upload raises
        self._copies = []
        return time.perf_counter() - t0

    def waiter(self):
        writes = list(self._writes)

        def wait(check: bool = True) -> int:
            for w in writes:
                if w.exception() is not None and check:
                    raise w.exception()
            return sum(w.result() for w in writes if w.exception() is None)

        return wait

    def _plan(self, obj, key: str, pairs: list):
        """`obj` with every tensor replaced by its host buffer, to be filled from the live one (added to
        `pairs`); containers rebuilt, other values copied now (e.g. ZeRO's live loss scaler)."""
        if torch.is_tensor(obj):
            if self._dest is None:
                self._unplanned.discard(key)
            buf = self._buffers.get(key)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = self._buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
            pairs.append((buf, obj.detach()))
            return buf
        if isinstance(obj, dict):
            out = copy.copy(obj)  # keeps OrderedDict / defaultdict
            for k, v in obj.items():
                out[k] = self._plan(v, f"{key}/{k}", pairs)
            return out
        if type(obj) in (list, tuple) or (isinstance(obj, tuple) and hasattr(obj, "_fields")):
            items = [self._plan(v, f"{key}/{i}", pairs) for i, v in enumerate(obj)]  # not torch.Size: no tensors
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return copy.deepcopy(obj)

    def end_plan(self) -> None:
        for key in self._unplanned:
            del self._buffers[key]
        self.inner = None

    def close(self) -> dict:
        """Waits for the writes; returns the buffers, which nothing reads any more."""
        for w in self._writes:
            w.exception()
        self._pool.shutdown()
        self._copier.shutdown()
        buffers, self._buffers = self._buffers, {}
        return buffers


def _fill(pairs) -> None:
    for buf, src in pairs:
        buf.copy_(src)


def _touch(buf: torch.Tensor) -> None:
    """Maps `buf`'s pages now: a byte of each page written (the kernel zeroes the rest), the last one
    too (a buffer that starts mid-page ends mid-page)."""
    flat = buf.reshape(-1).view(torch.uint8)
    flat[::mmap.PAGESIZE].zero_()
    flat[-1:].zero_()


def _place(host, zipfile: bool, pairs) -> None:
    """Moves each large host buffer of a CPU tensor to memory whose address is congruent to its data's
    position in the file (mod DirectFile.ALIGN), so that DirectFile writes it from there, not through
    its own buffer (a copy of the whole checkpoint: 0.43 s of CPU per 2.16 GB here, against 0.07 s).
    The positions come from a save that writes no data (18 ms for a 135M UNet's 686 tensors), since
    they move whenever the pickled part's length changes. A moved buffer keeps its tensor object, so
    `host` and the kept buffers follow it. Not for torch's legacy format (DeepSpeed's engine without a
    config), which orders the data by storage address: moving a buffer would move the positions."""
    if not zipfile:
        return
    at = _Layout()
    torch.save(host, at, _use_new_zipfile_serialization=zipfile)
    for buf, src in pairs:
        pos = at.positions.get(buf.data_ptr())
        if pos is not None and not src.is_cuda and (buf.data_ptr() - pos) % DirectFile.ALIGN:
            buf.set_(_aligned_empty(buf.shape, buf.dtype, pos % DirectFile.ALIGN))


class _Layout:
    """A file torch.save writes without its data: where each large record's data would start."""

    def __init__(self):
        self.size, self.positions = 0, {}  # data address -> file position

    def write(self, data) -> int:
        view = memoryview(data)
        if view.nbytes >= DirectFile.DIRECT_FROM:
            self.positions[np.frombuffer(view, np.uint8).ctypes.data] = self.size
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        pass


def _aligned_empty(shape, dtype, residue: int) -> torch.Tensor:
    """An empty CPU tensor at an address `residue` past a DirectFile.ALIGN boundary (its own mapping)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    region = mmap.mmap(-1, nbytes + DirectFile.ALIGN, flags=mmap.MAP_PRIVATE)  # the tensor keeps it
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=residue).view(dtype).view(shape)


def release(engine) -> None:
    """A subject's end: its writer's threads go; its buffers stay for the process's next writer (the
    lane's next subject: the same model's checkpoint fills the same buffers, with no page to map or
    pin again). One checkpoint's worth at most: the next plan frees what it does not use."""
    writer = _writers.pop(engine, None)
    if writer:
        buffers = writer.close()
        _kept.clear()
        _kept.update(buffers)


_writers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # training engine -> its SnapshotWriter
_kept: dict = {}  # the last released writer's buffers


def writer_for(engine) -> SnapshotWriter:
    """`engine`'s writer, kept for its life (its buffers are refilled at each checkpoint)."""
    writer = _writers.get(engine)
    if writer is None:
        writer = _writers[engine] = SnapshotWriter(dict(_kept))
        _kept.clear()
    return writer


def settle(engine) -> float:
    """Before `engine`'s optimizer step: waits for an async checkpoint's copy of the state it changes."""
    writer = _writers.get(engine)
    return writer.settle() if writer else 0.0


def delete_file(fs, path: str) -> None:
    """`path` gone, if it was there."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()

    def once():
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    retrying(once)


class _Bounded:
    """A storage stream written in flushed slices: pyarrow's S3 stream copies and queues every part it
    is given, with no bound, and torch.save hands it whole tensors (GBs) at memcpy speed; a flush
    waits for the queued parts, so at most `chunk` bytes are in flight."""

    def __init__(self, out, chunk: int = 64 << 20):
        self.out, self.chunk = out, chunk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        for i in range(0, len(view), self.chunk):
            self.out.write(view[i:i + self.chunk])
            self.out.flush()
        return len(view)

    def flush(self) -> None:
        self.out.flush()


def stream_to(fs, target: str, obj, zipfile: bool, after=()) -> int:
    """torch.save `obj` into `target` on `fs`, once the futures in `after` succeeded; returns the bytes stored."""
    for f in after:
        if f is not None:
            f.result()
    return store_file(fs, target, lambda out: torch.save(obj, _Bounded(out), _use_new_zipfile_serialization=zipfile))


class DirectFile:
    """A local file written around the page cache (O_DIRECT), through one page-aligned buffer, or from
    the caller's memory where its address and the file position agree (mod ALIGN) and it is large.

    A buffered write of a checkpoint costs the kernel's copy into the page cache, on the writing
    thread's CPU, which a CPU-only machine takes from the training steps: 2.16 GB took 0.9-6.3 s of it
    here (over four runs), through the buffer 0.26-1.19 s (the copy into it; the disk's DMA does the
    rest), from placed host buffers (SnapshotWriter) 0.07-0.09 s (benchmarks/checkpoint_write.py). The
    last block is written padded, then the file is cut to its size."""

    ALIGN = 4096  # a multiple of any logical block size; the buffer is page-aligned (mmap)
    DIRECT_FROM = 1 << 20  # smaller writes are copied: the blocks around a direct one are, anyway
    refused = False  # a write was refused (EINVAL): this process writes buffered from then on

    def __init__(self, path: str, buffer: int = 16 << 20):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self._mmap = mmap.mmap(-1, buffer, flags=mmap.MAP_PRIVATE)
        self._buf, self._fill, self._size = np.frombuffer(self._mmap, np.uint8), 0, 0

    @classmethod
    def takes(cls, fs) -> bool:
        """Whether files on `fs` may be written direct (`open` still finds out whether its folder's filesystem
        allows it)."""
        import pyarrow.fs as pafs

        return not cls.refused and isinstance(fs, pafs.LocalFileSystem) and hasattr(os, "O_DIRECT")

    @classmethod
    def open(cls, fs, path: str):
        """One on a local `fs` that takes O_DIRECT, else None (tmpfs and some others refuse it)."""
        if not cls.takes(fs):
            return None
        try:
            return cls(path)
        except OSError:
            return None

    def write(self, data) -> int:
        src = np.frombuffer(data, np.uint8)
        if len(src) >= self.DIRECT_FROM and (src.ctypes.data - self._size) % self.ALIGN == 0:
            head = -self._size % self.ALIGN
            body = (len(src) - head) // self.ALIGN * self.ALIGN
            self._copy(src[:head])  # completes the buffer's last block
            if self._fill:
                self._drain(self._fill)
            with memoryview(data).cast("B") as view:
                self._send(view[head:head + body])
            self._size += body
            self._copy(src[head + body:])
        else:
            self._copy(src)
        return len(src)

    def _copy(self, src) -> None:
        done = 0
        while done < len(src):  # numpy's copy drops the GIL: the training thread keeps it
            n = min(len(self._buf) - self._fill, len(src) - done)
            self._buf[self._fill:self._fill + n] = src[done:done + n]
            self._fill, done = self._fill + n, done + n
            if self._fill == len(self._buf):
                self._drain(self._fill)
        self._size += len(src)

    def _drain(self, n: int) -> None:
        with memoryview(self._mmap) as whole, whole[:n] as view:  # released on an error too: close() unmaps it
            self._send(view)
        self._fill = 0

    def _send(self, view) -> None:
        sent = 0
        try:
            while sent < len(view):
                sent += os.write(self._fd, view[sent:])
        except OSError as e:
            if e.errno == errno.EINVAL:  # a filesystem that opens O_DIRECT and refuses its writes:
                type(self).refused = True  # store_file's retry writes the file buffered
            raise

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:  # a partial block waits in the buffer: O_DIRECT writes whole ones
        pass

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._fill:
                self._drain(-(-self._fill // self.ALIGN) * self.ALIGN)
                os.ftruncate(self._fd, self._size)
        finally:
            os.close(self._fd)
            self._fd = -1
            del self._buf
            self._mmap.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def store_file(fs, target: str, write, attempts: int = 6) -> int:
    """`write(stream)` into `target` on `fs` with an explicit close (which raises), its stored size
    checked against the bytes written; retried as a whole on a store error. Returns the bytes stored.
    A local file is written around the page cache where the filesystem allows (DirectFile)."""
    def once() -> int:
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with DirectFile.open(fs, target) or fs.open_output_stream(target) as out:
            write(out)
            size = out.tell()
        stored = fs.get_file_info(target).size
        if stored != size:
            raise OSError(f"{target}: stored {stored} bytes of {size}")
        return size

    return retrying(once, attempts)


def retrying(fn, attempts: int = 6):
    """fn() again after a transient store error (an OSError from pyarrow), with backoff. Not for a
    missing file (FileNotFoundError): that answer is not going to change."""
    for attempt in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(min(0.5 * 2**attempt, 8))
