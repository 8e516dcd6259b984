"""The job report (outputs/<job>/report.html) opened in a real headless Chromium, and the loss history it
draws. The browser test needs Debian's `chromium` package (.ci/run installs it when missing)."""

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_ray import cli, report
from dreambooth_ray.spec import load_spec
from dreambooth_ray.storage import Storage
from dreambooth_ray.tracking import History

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # --enable-logging=stderr: the page's console messages (a blocked or failed load among them) on stderr.
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", "--no-first-run", "--enable-logging=stderr", *args], capture_output=True, text=True, timeout=timeout)


def test_loss_history_is_every_step_once_and_ends_at_the_reported_loss(quickstart):
    """Rank 0 writes the per-step metrics at each checkpoint; read back they are steps 1..N once each,
    and the last is the loss job.json reports (the same all-reduced number)."""
    store = Storage(str(quickstart.store))
    out = ("outputs", "quickstart", "toy")
    record, trained = store.read_json(*out, "job.json"), store.read_json(*out, "train.json")
    steps = quickstart.data["train"]["steps"]
    chunks = store.listdir(*out, "history", trained["run"])
    every = quickstart.data["train"]["checkpoint_every"]
    assert chunks == [f"steps-{a:07d}-{min(a + every - 1, steps):07d}.json" for a in range(1, steps + 1, every)]
    h = History.read(store, *out, "history", trained["run"])
    assert [r["step"] for r in h] == list(range(1, steps + 1))
    assert h[-1]["loss"] == record["metrics"]["loss"]
    assert h[-1]["prior_loss"] == record["metrics"]["prior_loss"]


def test_history_keeps_a_resumed_attempts_steps(tmp_path):
    """A resumed attempt rewrites the steps after its checkpoint: the newer chunk wins, step by step."""
    store = Storage(str(tmp_path))
    row = lambda s, loss, t: {"step": s, "time": t, "loss": loss}  # noqa: E731
    store.write_json({"steps": [row(s, 1.0, 100 + s) for s in (1, 2, 3, 4)]}, "h", "steps-0000001-0000004.json")
    store.write_json({"steps": [row(s, 2.0, 200 + s) for s in (3, 4, 5)]}, "h", "steps-0000003-0000005.json")
    assert [(r["step"], r["loss"]) for r in History.read(store, "h")] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)]


def test_loss_svg_puts_each_step_where_its_value_says():
    h = [{"step": s, "loss": 1.0 / s, "instance_loss": 0.5 / s, "prior_loss": None} for s in range(1, 11)]
    svg = report.loss_svg(h, w=250, h=130)
    pts = re.search(r'data-key="loss"[^>]*points="([^"]+)"', svg).group(1).split()
    xy = [tuple(map(float, p.split(","))) for p in pts]
    assert len(xy) == 10 and 'data-key="prior_loss"' not in svg  # no values, no curve
    # x from 40 to w - 10 over steps 1..10; y from 10 (the largest value of any curve, 1.0) to h - 20 (the
    # smallest, the subject loss's 0.05): the total loss ends at 0.1, 0.05 / 0.95 of the range up from the bottom.
    assert xy[0] == (40.0, 10.0) and xy[-1][0] == 240.0 and xy[-1][1] == pytest.approx(110 - 100 * 0.05 / 0.95, abs=0.05)
    inst = re.search(r'data-key="instance_loss"[^>]*points="([^"]+)"', svg).group(1).split()
    assert inst[-1] == "240.0,110.0"
    assert xy[4][0] == pytest.approx(40 + 200 * 4 / 9, abs=0.05)
    assert xy[4][1] == pytest.approx(10 + 100 * (1 - (0.2 - 0.05) / 0.95), abs=0.05)


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium: apt-get install chromium "
                                               "(Debian's package; .ci/run installs it)")
def test_report_renders_in_a_real_browser_with_nothing_external(quickstart, tmp_path):
    assert cli.main(["report", str(quickstart.spec_file)]) == 0
    spec = load_spec(quickstart.spec_file)
    page = quickstart.store / "outputs" / "quickstart" / "report.html"
    text = page.read_text()
    # Self-contained: no URL the browser would fetch (every image is a data: URI), and a CSP forbidding any.
    assert not re.search(r'(src|href)="(?!data:)', text)
    assert "default-src 'none'" in text

    res = chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    dom = res.stdout
    # Nothing the page asked for was blocked or failed (Chromium logs either as a console message).
    assert "Content Security Policy" not in res.stderr and "net::ERR" not in res.stderr, res.stderr[-2000:]
    n_photos = len(list(Path(spec.subjects[0].images).iterdir()))
    assert dom.count('class="subject"') == len(spec.subjects) == 1
    validation = list((quickstart.store / "outputs" / "quickstart" / "toy" / "validation").rglob("*.png"))
    # Every image decoded (the page's own count, taken at load): the photos, the sample grid, the validation images.
    images = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert validation and images == n_photos + 1 + len(validation) and 'data-broken="0"' in dom
    assert dom.count('class="curve"') == 3  # loss, subject loss, prior loss
    # done (test_job's re-run may have skipped it since: "done (earlier run)"), with its steps
    assert re.search(r"<td>toy</td><td>done[^<]*</td><td>%d</td>" % quickstart.data["train"]["steps"], dom)

    shot = tmp_path / "report.png"
    res = chromium(f"--screenshot={shot}", "--window-size=1000,1400", "--virtual-time-budget=5000", page.as_uri())
    assert shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as im:
        im = im.convert("RGB")
    assert im.size == (1000, 1400)
    colours = np.unique(np.asarray(im.resize((100, 140))).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # drawn: text, photos and the grid, not a blank page


def read_events(folder: Path) -> list:
    """Every event in a folder's TensorBoard files, parsed from the TFRecord framing by hand (u64 length,
    u32 CRC, payload, u32 CRC) with TensorBoard's protobuf schema (as tensorboardX ships it)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for f in sorted(folder.iterdir()):
        data, k = f.read_bytes(), 0
        while k < len(data):
            (n,) = struct.unpack("<Q", data[k:k + 8])
            e = event_pb2.Event()
            e.ParseFromString(data[k + 12:k + 12 + n])
            events.append(e)
            k += 12 + n + 4
    return events


def test_tensorboard_holds_every_steps_metrics_and_the_validation_images(quickstart):
    """The subject's TensorBoard run (outputs/<job>/tensorboard/<subject>/, in the job's storage): the loss,
    prior loss, lr and steps/s of every step, equal (as float32) to the history the report draws; and the
    validation images of every `validation_every`-th step, one per sample prompt, as stored PNGs."""
    data = quickstart.data
    store = Storage(str(quickstart.store))
    out = ("outputs", "quickstart", "toy")
    run = store.read_json(*out, "train.json")["run"]
    events = read_events(quickstart.store / "outputs" / "quickstart" / "tensorboard" / "toy")
    scalars, images = {}, {}
    for e in events:
        for v in e.summary.value:
            if v.HasField("image"):
                images.setdefault(e.step, []).append((v.tag, v.image.encoded_image_string))
            else:
                scalars[(v.tag, e.step)] = v.simple_value
    history = History.read(store, *out, "history", run)
    for k in ("loss", "prior_loss", "lr", "steps_per_s"):
        got = [scalars[(f"train/{k}", r["step"])] for r in history]
        assert got == pytest.approx([r[k] for r in history], rel=1e-6), k
    every, steps = data["samples"]["validation_every"], data["train"]["steps"]
    val_steps = list(range(every, steps + 1, every))
    assert sorted(images) == val_steps
    prompts = data["samples"]["prompts"]
    for step in val_steps:
        stored = store.listdir(*out, "validation", run, f"step-{step:07d}")
        assert stored == [f"{k:02d}.png" for k in range(len(prompts))]
        tb = sorted(images[step])
        assert [t for t, _ in tb] == [f"validation/{k:02d} {p.format(identifier='sks', class_noun='toy')}"
                                      .replace(" ", "_") for k, p in enumerate(prompts)]  # TensorBoard's tag form
        for (_, png), name in zip(tb, stored):  # the same pixels
            with Image.open(io.BytesIO(png)) as a, Image.open(quickstart.store / "outputs" / "quickstart" / "toy" /
                                                               "validation" / run / f"step-{step:07d}" / name) as b:
                assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
