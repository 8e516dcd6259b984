"""What a user sees while a job runs: a row per subject (stage, progress bar, step/total, loss, ETA) and
the class-image progress, live on a terminal; elsewhere (CI, `ray job logs`, a file) one line per stage
change and a progress line every fifth of a run.

Subjects run in Ray tasks and train in Ray Train workers, on any node. None of them prints: they send
progress to the job's `Board` actor through a `Reporter`, and the driver draws the board. Worker output
stays in Ray's logs (kept in storage under outputs/<job>/logs/, see `save_logs`), not on the console.

Once a subject is done, its time by stage reads the same on the console (the results table) and in the
report: both format it with `format_timeline`, here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

PROGRESS_LINES = 5  # progress lines per training run, without a terminal


@ray.remote(num_cpus=0)
class Board:
    """The job's progress: per row (a subject, a class-image set) its stage and counts; and the log lines."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.lines: list[str] = []
        # A progress line each fifth of a run, for consoles without a terminal. Made here, as the
        # progress arrives, so none is lost when a run ends between two of the driver's reads.
        self.progress_lines: list[str] = []

    def stage(self, who: str, stage: str, line: str | None = None, total: int | None = None) -> None:
        self.rows[who] = {"stage": stage, "since": time.time(), "done": 0, "total": total, "loss": None}
        self.lines.append(f"{who}: {line or stage}")

    def progress(self, who: str, done: int, total: int, loss: float | None = None) -> None:
        row = self.rows.setdefault(who, {"stage": "", "since": time.time(), "loss": None})
        row.update(done=done, total=total, loss=loss if loss is not None else row.get("loss"))
        if "first" not in row or done < row["first"][0]:
            row["first"] = (done, time.time())  # the ETA counts from here (a resumed run starts mid-way)
        row["at"] = time.time()
        mark = done * PROGRESS_LINES // total if total and row.get("stage") == "training" else 0
        if mark > row.get("mark", 0):  # per stage (stage() starts a new row): SR counts anew
            row["mark"] = mark
            self.progress_lines.append(f"{who}: {progress_text(row)}")

    def say(self, who: str, line: str) -> None:
        self.lines.append(f"{who}: {line}")

    def read(self, since: int) -> tuple[dict, list[str]]:
        return self.rows, self.lines[since:]

    def read_progress(self, since: int) -> list[str]:
        return self.progress_lines[since:]


@dataclass
class Reporter:
    """A subject's (or a class-image set's) handle on the board; prints when there is none (tests, tools)."""

    who: str
    board: object = None

    def stage(self, stage: str, line: str | None = None, total: int | None = None) -> None:
        if self.board is None:
            print(f"{self.who}: {line or stage}", flush=True)
        else:
            self.board.stage.remote(self.who, stage, line, total)

    def say(self, line: str) -> None:
        if self.board is None:
            print(f"{self.who}: {line}", flush=True)
        else:
            self.board.say.remote(self.who, line)

    def progress(self, done: int, total: int, loss: float | None = None) -> None:
        if self.board is not None:
            self.board.progress.remote(self.who, done, total, loss)

    def child(self, who: str) -> "Reporter":
        return Reporter(who, self.board)


@dataclass
class Chorus:
    """Several subjects' reporters as one (a pack's): each hears what is said to the pack."""

    reporters: list

    def say(self, line: str) -> None:
        for r in self.reporters:
            if r is not None:
                r.say(line)


@dataclass
class View:
    """Draws a board on the driver: live on a terminal, lines elsewhere."""

    console: object  # rich.console.Console
    board: object
    seen: int = 0
    progress_seen: int = 0  # progress lines printed (no terminal)
    live: object = None

    def __enter__(self) -> "View":
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.refresh()
        if self.live is not None:
            self.live.__exit__(*exc)

    def refresh(self) -> None:
        try:
            rows, lines = ray.get(self.board.read.remote(self.seen), timeout=10)
            progress = [] if self.live is not None else ray.get(
                self.board.read_progress.remote(self.progress_seen), timeout=10)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            return
        self.seen += len(lines)
        self.progress_seen += len(progress)
        for line in lines + progress:  # without a terminal: a progress line each fifth of a run
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
        if self.live is not None:
            self.live.update(table(rows))


def eta(row: dict) -> float | None:
    first = row.get("first")
    done, total = row.get("done") or 0, row.get("total")
    if not first or not total or done <= first[0]:
        return None
    rate = (done - first[0]) / max(row["at"] - first[1], 1e-9)
    return (total - done) / rate


def progress_text(row: dict) -> str:
    parts = [f"step {row.get('done') or 0}/{row.get('total')}"]
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.4f}")
    left = eta(row)
    if left is not None:
        parts.append(f"ETA {left:.0f} s")
    return ", ".join(parts)


def table(rows: dict):
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for col in ("", "stage", "progress", "", "loss", "ETA"):
        t.add_column(col)
    for who, row in rows.items():
        total, done = row.get("total"), row.get("done") or 0
        bar = ProgressBar(total=total, completed=done, width=30) if total else ""
        left = eta(row)
        t.add_row(who, row.get("stage", ""), bar, f"{done}/{total}" if total else "",
                  f"{row['loss']:.4f}" if row.get("loss") is not None else "",
                  f"{left:.0f} s" if left is not None else "")
    return t


# A subject's time, stage by stage, as job.json, results.json and the results table show it.
TIMELINE = (("waiting_for_a_slot", "slot"), ("waiting_for_class_images", "priors"), ("encode", "enc"),
            ("worker_start", "start"),
            ("model_load", "load"), ("latent_cache_and_engine", "cache"), ("checkpoint_buffers", "buffers"),
            ("steps", "steps"), ("checkpoint_stalls", "ckpt"), ("validation_handover", "val"), ("sr", "sr"),
            ("export", "export"), ("samples", "samples"))


def format_timeline(t: dict) -> str:
    io = f" io {t['bytes_written'] / 1e6:.1f}/{t['bytes_read'] / 1e6:.1f} MB" if "bytes_written" in t else ""
    return " ".join(f"{short} {t[k]:.0f}s" for k, short in TIMELINE if k in t) + io


def log_files() -> dict[str, list[str]]:
    """{node id: this driver's Ray job's worker log files there} (Ray's state API, which the dashboard
    serves); empty where the API is unavailable."""
    from ray.util.state import list_logs

    ctx = ray.get_runtime_context()
    tag, found = f"-{ctx.get_job_id()}-", {}
    try:
        if not _dashboard_address():
            return {}  # no state API to ask: Ray's client would wait 40 s for one to register, each call
        for node in ray.nodes():
            if node.get("Alive"):
                files = list_logs(address=ctx.gcs_address, node_id=node["NodeID"])
                found[node["NodeID"]] = [n for n in files.get("worker_out", []) + files.get("worker_err", [])
                                         if tag in n]
    except Exception:  # noqa: BLE001 -- logs are a convenience: never fail a job over them
        return {}
    return found


def _dashboard_address() -> str | None:
    """Where the cluster's dashboard (which serves the state API) registered itself; None when none
    did (it failed to start: its port taken, its packages missing). Asked once, without waiting."""
    from ray._private import ray_constants
    from ray.experimental import internal_kv

    found = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    return found.decode() if found else None


# Ray's driver prints each error the cluster publishes for its job to stdout, log_to_driver or not: a
# dead worker is a ~900-character "(raylet) A worker died or was killed ..." paragraph, before the line
# in which we say it ("attempt 1 failed (ActorDiedError: ...); resuming from the last checkpoint", or
# the subject's failure). Those go to the job's logs folder (save_ray_errors), not the console, as does
# Ray's advice on how many worker processes it started (the job, not the user, chose its actors); any
# other (e.g. a resource request no node can meet) still reaches the console as Ray wrote it.
RAY_ERRORS: list[str] = []
_OFF_CONSOLE = ("A worker died or was killed", "Worker exit type", "was killed due to the node running low on memory",
                "PYTHON worker processes have been started")


def route_ray_errors() -> None:
    """Keep Ray's worker-death paragraphs off the console (into RAY_ERRORS). Ray's error listener
    thread looks `print_to_stdstream` up at each message, so this wraps that function."""
    from ray._private import worker as ray_worker

    shown = getattr(ray_worker, "print_to_stdstream", None)
    if shown is None or getattr(shown, "routed", False):  # (a Ray without it: its paragraphs stay on the console)
        return

    def route(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            return shown(data, ignore_prefix)
        lines = [str(line) for line in data.get("lines") or []]
        RAY_ERRORS.append(time.strftime("%Y-%m-%d %H:%M:%S ") + "\n".join(lines))
        if not any(s in line for line in lines for s in _OFF_CONSOLE):
            shown(data, ignore_prefix)

    route.routed = True
    ray_worker.print_to_stdstream = route


def save_ray_errors(storage, job: str, since: int = 0) -> str | None:
    """The errors Ray published for this driver since index `since` of RAY_ERRORS, as
    outputs/<job>/logs/driver/ray-errors.log; returns its URL (None when there were none)."""
    found = RAY_ERRORS[since:]
    if not found:
        return None
    try:
        storage.write_bytes(("\n\n".join(found) + "\n").encode(), "outputs", job, "logs", "driver", "ray-errors.log")
    except Exception:  # noqa: BLE001 -- logs are a convenience: never fail a finished job over them
        return None
    return storage.url("outputs", job, "logs", "driver", "ray-errors.log")


def save_logs(storage, job: str, skip: dict[str, list[str]] | None = None) -> int:
    """Copies this Ray job's worker logs, from every node, to outputs/<job>/logs/<node address>/, except
    those in `skip` (the files that existed when the job started: a driver that runs several jobs keeps
    each one's logs apart). Returns the number of files copied."""
    from ray.util.state import get_log

    address, n = ray.get_runtime_context().gcs_address, 0
    nodes = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    try:
        for node_id, names in log_files().items():
            for name in set(names) - set((skip or {}).get(node_id, [])):
                text = "".join(get_log(address=address, filename=name, node_id=node_id, tail=-1))
                _, worker, _, pid = name.split("-")  # worker-<id>-<job>-<pid>.out: too long a name
                storage.write_bytes(text.encode(), "outputs", job, "logs", nodes[node_id], f"worker-{worker[:12]}-{pid}")
                n += 1
    except Exception:  # noqa: BLE001 -- logs are a convenience: never fail a finished job over them
        return n
    return n
