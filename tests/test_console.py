"""The console: the job's Board actor drawn by the driver, as lines without a terminal and as a live table
on one; and what the quickstart (run by the CLI in its own process, see conftest) printed."""

import io

import ray
from rich.console import Console

from dreambooth_ray.console import Board, Reporter, View


def test_without_a_terminal_one_line_per_stage_and_per_fifth_of_the_steps(ray_cluster):
    board = Board.remote()
    out = io.StringIO()
    view = View(Console(file=out, force_terminal=False, width=200), board)
    r = Reporter("dog", board)
    r.stage("training", "training 20 steps", total=20)
    seen = []
    for step in range(1, 21):
        r.progress(step, 20, loss=1.0 / step)
        ray.get(board.read.remote(0))  # the actor has every update so far (calls from one caller run in order)
        view.refresh()
        seen.append(out.getvalue().count("\n"))
    r.stage("done", "model -> x")
    view.refresh()
    lines = out.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == ["dog: training 20 steps", *(f"dog: step {s}/20" for s in
                                                  (4, 8, 12, 16, 20)), "dog: model -> x"]
    assert lines[1].split(", ")[1] == "loss 0.2500" and lines[5].split(", ")[1] == "loss 0.0500"
    assert seen[3] == 2 and seen[2] == 1  # the line for step 4 came at step 4, not before
    ray.kill(board)


def test_on_a_terminal_a_live_table_with_a_row_per_subject(ray_cluster):
    board = Board.remote()
    out = io.StringIO()
    con = Console(file=out, force_terminal=True, width=120, color_system=None)
    with View(con, board) as view:
        Reporter("cat", board).stage("training", "training 10 steps", total=10)
        Reporter("priors 'a cat'", board).stage("class images", "8 class images", total=8)
        Reporter("cat", board).progress(5, 10, loss=0.5)
        Reporter("priors 'a cat'", board).progress(8, 8)
        ray.get(board.read.remote(0))
        view.refresh()
        rows, _ = ray.get(board.read.remote(0))
        assert rows["cat"]["done"] == 5 and rows["priors 'a cat'"]["done"] == 8
        view.live.refresh()
        text = out.getvalue()
    assert "cat: training 10 steps" in text and "5/10" in text and "0.5000" in text and "8/8" in text
    ray.kill(board)


def test_the_quickstarts_console_is_short_and_clean(quickstart):
    """The issue's target: at most 30 lines to a file, none repeated, no traceback; the workers' full logs
    are in storage instead (their per-step lines among them)."""
    lines = [ln for ln in quickstart.printed.splitlines() if ln.strip()]
    assert quickstart.rc == 0
    assert len(lines) <= 30, quickstart.printed
    assert len(set(lines)) == len(lines), quickstart.printed
    assert "Traceback" not in quickstart.printed and "Failed to query" not in quickstart.printed
    steps = quickstart.data["train"]["steps"]
    assert f"toy: step {steps}/{steps}" in quickstart.printed and "report -> " in quickstart.printed
    # The line that starts training states the global batch (batch_size is per worker) and the rate
    assert (f"toy: training {steps} steps, full, lr 0.0002, global batch 2 (1 per worker x 2 worker(s) x 1 "
            f"accumulation), {2 * steps} subject images in {steps} steps") in quickstart.printed
    logs = list((quickstart.store / "outputs" / "quickstart" / "logs").rglob("worker-*"))
    assert any(f"[toy] step {steps}/{steps} loss" in p.read_text(errors="replace") for p in logs)
