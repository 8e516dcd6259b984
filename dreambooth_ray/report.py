"""The job report: outputs/<job>/report.html, one self-contained page (images inlined as data: URIs, no
external script, style or font; a Content-Security-Policy forbids any) that works downloaded from s3://.

It holds the batch table (status, steps, final loss, time, the per-subject timeline) and, per subject, its
photos, its sample grid, the validation images over the steps, its loss curves and, once `eval` has run,
its metrics. `run_job` and `eval` write it; `dreambooth-ray report JOB.yaml` rebuilds it.
"""

from __future__ import annotations

import base64
import html

from .spec import JobSpec, Subject
from .storage import Storage

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}section{border-top:2px solid #ddd;margin-top:24px;padding-top:8px}
img{image-rendering:pixelated;margin:2px;vertical-align:top}.photos img{width:96px;height:96px}
.grid img{max-width:100%}.val img{width:96px;height:96px}.failed{color:#b00}.muted{color:#777}
svg{background:#fafafa;border:1px solid #ddd}
"""
# Counts, once every image has decoded, those that did not: a test (and a curious user) reads it from the DOM.
_SCRIPT = """window.addEventListener('load',function(){var i=document.images,b=0;for(var k=0;k<i.length;k++)
{if(!i[k].complete||i[k].naturalWidth===0)b++;}document.body.setAttribute('data-images',i.length);
document.body.setAttribute('data-broken',b);});"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def _img(data: bytes | None, alt: str, mime: str = "image/png") -> str:
    if not data:
        return ""
    return f'<img alt="{html.escape(alt)}" title="{html.escape(alt)}" src="data:{mime};base64,' \
           f'{base64.b64encode(data).decode()}">'


def loss_svg(history: list[dict], keys=("loss", "instance_loss", "prior_loss"), w: int = 480, h: int = 180) -> str:
    """Loss curves as an inline SVG: one polyline per key over the steps, axes labelled with the ranges."""
    if not history:
        return '<p class="muted">no loss history</p>'
    colours = {"loss": "#222", "instance_loss": "#1f77b4", "prior_loss": "#d62728"}
    steps = [r["step"] for r in history]
    values = [r[k] for r in history for k in keys if r.get(k) is not None]
    lo, hi = min(values), max(values)
    s0, s1 = min(steps), max(steps)
    x = lambda s: 40 + (w - 50) * ((s - s0) / ((s1 - s0) or 1))  # noqa: E731
    y = lambda v: 10 + (h - 30) * (1 - (v - lo) / ((hi - lo) or 1))  # noqa: E731
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    for k in keys:
        pts = " ".join(f"{x(r['step']):.1f},{y(r[k]):.1f}" for r in history if r.get(k) is not None)
        if pts:
            lines.append(f'<polyline class="curve" data-key="{k}" fill="none" stroke="{colours[k]}" '
                         f'stroke-width="1.5" points="{pts}"/>')
    lines.append(f'<text x="2" y="14" font-size="10">{hi:.3g}</text><text x="2" y="{h - 20}" font-size="10">{lo:.3g}</text>'
                 f'<text x="40" y="{h - 4}" font-size="10">step {s0}</text>'
                 f'<text x="{w - 60}" y="{h - 4}" font-size="10">step {s1}</text>')
    legend = " ".join(f'<tspan fill="{colours[k]}">{k}</tspan>' for k in keys)
    lines.append(f'<text x="{w // 2 - 80}" y="14" font-size="11">{legend}</text></svg>')
    return "".join(lines)


def _subject_section(spec: JobSpec, subject: Subject, storage: Storage, result: dict | None, metrics: dict | None) -> str:
    from .images import read_images
    from .samples import png_bytes
    from .tracking import History

    out = ("outputs", spec.name, subject.name)
    record = storage.read_json(*out, "job.json") or {}
    trained = storage.read_json(*out, "train.json") or {}
    parts = [f'<section class="subject" id="subject-{html.escape(subject.name)}"><h2>{html.escape(subject.name)}</h2>',
             f'<p>{html.escape(record.get("instance_prompt") or subject.instance_text)} '
             f'<span class="muted">({html.escape(subject.class_noun)}; model {html.escape(record.get("model", "-"))})'
             f'</span></p>']
    try:  # quietly: the preflight (or the failed subject) named each bad file once already
        photos, bad = read_images(subject.images, spec.train.resolution, spec.s3, quiet=True)
        parts.append('<h3>Photos</h3><div class="photos">' + "".join(_img(png_bytes(p.image), p.name) for p in photos)
                     + "</div>")
        if bad:
            parts.append('<p class="muted">not used: ' + html.escape("; ".join(f"{n}: {why}" for n, why in bad)) + "</p>")
    except Exception as e:  # noqa: BLE001 -- the report still shows what it can
        parts.append(f'<p class="failed">photos: {html.escape(str(e).splitlines()[0])}</p>')
    grid = storage.read_bytes(*out, "samples.png")
    parts.append("<h3>Samples</h3>" + (f'<div class="grid">{_img(grid, "samples")}</div>' if grid
                                       else '<p class="muted">no samples yet</p>'))
    run = trained.get("run")
    if run:
        steps = sorted(storage.listdir(*out, "validation", run))
        if steps:
            parts.append("<h3>Validation images over the steps</h3><table>")
            for step in steps:
                names = storage.listdir(*out, "validation", run, step)
                cells = "".join(_img(storage.read_bytes(*out, "validation", run, step, n), f"{step} {n}")
                                for n in names if n.endswith(".png"))
                parts.append(f'<tr><th>{html.escape(step)}</th><td class="val">{cells}</td></tr>')
            parts.append("</table>")
        parts.append("<h3>Loss</h3>" + loss_svg(History.read(storage, *out, "history", run)))
    if metrics:
        m = metrics.get("metrics", {})
        parts.append("<h3>Evaluation</h3><table><tr>" + "".join(f"<th>{k}</th>" for k in m) + "</tr><tr>"
                     + "".join(f"<td>{'-' if v is None else f'{v:.3f}'}</td>" for v in m.values()) + "</tr></table>")
    if result and result.get("error"):
        parts.append(f'<p class="failed">error: {html.escape(result["error"])}</p>')
    parts.append("</section>")
    return "".join(parts)


def build(spec: JobSpec, storage: Storage | None = None) -> str:
    """Writes outputs/<job>/report.html from what the job's storage holds now; returns its URL."""
    from .console import format_timeline

    storage = storage or Storage(spec.storage, spec.s3)
    results = {r["name"]: r for r in (storage.read_json("outputs", spec.name, "results.json") or {}).get("subjects", [])}
    evals = {r["subject"]: r for r in (storage.read_json("outputs", spec.name, "eval.json") or {}).get("subjects", [])}
    rows = []
    for s in spec.subjects:
        r = results.get(s.name, {})
        loss = r.get("final_loss")
        # A re-run skips a finished subject: it is done, by an earlier run.
        status = "done (earlier run)" if r.get("status") == "skipped" else r.get("status", "not run")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            s.name, status, r.get("steps", "-"), "-" if loss is None else f"{loss:.4f}",
            f"{r['seconds']:.0f} s" if r.get("seconds") else "-", format_timeline(r.get("timeline") or {}) or "-",
            r.get("error") or r.get("model") or "")) + "</tr>")
    page = [
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>{html.escape(spec.name)}: DreamBooth report</title><style>{_CSS}</style><script>{_SCRIPT}</script>",
        f"</head><body><h1>{html.escape(spec.name)}</h1><p class=\"muted\">base model {html.escape(spec.model)}; "
        f"{len(spec.subjects)} subject(s); storage {html.escape(storage.url('outputs', spec.name))}</p>",
        "<table class=\"batch\"><tr><th>subject</th><th>status</th><th>steps</th><th>final loss</th><th>time</th>"
        "<th>time by stage</th><th>output / error</th></tr>", *rows, "</table>",
        *(_subject_section(spec, s, storage, results.get(s.name), evals.get(s.name)) for s in spec.subjects),
        "</body></html>",
    ]
    storage.write_bytes("".join(page).encode(), "outputs", spec.name, "report.html")
    return storage.url("outputs", spec.name, "report.html")


def cmd_report(args, console) -> int:
    from .spec import load_spec

    url = build(load_spec(args.job))
    console.print(f"report -> {url}", highlight=False, soft_wrap=True)
    return 0
