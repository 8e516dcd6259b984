"""DreamBooth's claims, measured in the toy world (#13), through the product's own training path.

For a shipped toy-world subject (dreambooth_ray.toyworld.SUBJECTS, photos in jobs/toyworld-subjects/),
`dreambooth-ray run` fine-tunes the pretrained built-in `toy` model twice: with the prior-preservation
loss and without it. The base model and both fine-tuned models then sample the same prompts with the
same seeds, and the toy-world judge (a classifier of class, colour, pattern and scene, shipped in
dreambooth_ray/assets/toy/judge.safetensors) reads every sample:

  fidelity        "a sks toy in <scene>": samples showing the subject (its class, colour and pattern);
                  the base model's "a toy in <scene>" is the before.
  recontext       the same samples: the prompted scene (the subject's photos show none of these scenes).
  pres            "a toy in <scene>" after fine-tuning: class samples that show the subject's colour and
                  pattern (the paper's PRES: language drift toward the subject; lower is better).
  div             distinct (colour, pattern) pairs among those class samples / all pairs (the paper's DIV
                  stand-in: output diversity of the class).

Writes benchmarks/results/toyworld.json and benchmarks/results/toyworld.png (rows: base, no prior,
prior; columns: prompts).

  python benchmarks/toyworld_claims.py [--subject toy-purple-dots] [--steps 150] [--n 16]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dreambooth_ray import toyworld as tw  # noqa: E402

SCENES = ("beach", "snow")  # never in the subjects' photos


def run_job(subject: str, storage: Path, steps: int, prior: bool, lr: float) -> tuple[str, float]:
    import yaml

    from dreambooth_ray import cli

    data = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    cls = tw.SUBJECTS[subject]["cls"]
    data.update(name=f"claims-{'prior' if prior else 'noprior'}", storage=str(storage))
    data["subject"] = dict(name=subject, images=str(ROOT / "jobs" / "toyworld-subjects" / subject), **{"class": cls},
                           identifier="sks")
    data["train"].update(steps=steps, checkpoint_every=steps, learning_rate=lr)
    data["prior"]["enabled"] = prior
    data["samples"]["prompts"] = ["a {identifier} {class_noun} on the beach"]
    spec = storage / "job.yaml"
    storage.mkdir(parents=True, exist_ok=True)
    spec.write_text(yaml.safe_dump(data))
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["run", str(spec)])
    if rc != 0:
        raise SystemExit(f"dreambooth-ray run {spec} failed (rc {rc})")
    model = next(storage.glob(f"outputs/{data['name']}/{subject}/model"))
    return str(model), time.time() - t0


def measure(pipe, judge, subject: str, n: int, seed: int, steps: int, identifier: str | None) -> dict:
    import torch

    want = tw.SUBJECTS[subject]
    out, images = {}, {}
    for scene in SCENES:
        at = tw.Attrs(cls=want["cls"], colour=want["colour"], scene=scene)
        prompt = tw.caption(at, colour=False, scene=True, identifier=identifier)
        ims = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(seed)).images
        preds = tw.judge_predict(judge, ims)
        subj = [p["cls"] == want["cls"] and p["colour"] == want["colour"] and p["pattern"] == want["pattern"]
                for p in preds]
        out[prompt] = dict(subject=sum(subj) / n, scene=sum(p["scene"] == scene for p in preds) / n,
                           cls=sum(p["cls"] == want["cls"] for p in preds) / n,
                           pairs=len({(p["colour"], p["pattern"]) for p in preds}))
        images[prompt] = ims
    return out, images


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subject", default="toy-purple-dots", choices=sorted(tw.SUBJECTS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--n", type=int, default=16, help="samples per prompt")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toyworld.json"))
    ap.add_argument("--work", default=None, help="storage root for the runs (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    from dreambooth_ray import models

    torch.set_num_threads(1)
    judge = tw.load_shipped_judge()
    work = Path(args.work or tempfile.mkdtemp(prefix="toyworld-claims-"))
    result = dict(subject=args.subject, attrs=tw.SUBJECTS[args.subject], steps=args.steps, lr=args.lr, n=args.n,
                  sample_steps=args.sample_steps, seed=args.seed, judge="dreambooth_ray/assets/toy/judge.safetensors",
                  models={})
    grids = {}
    base = models.load_pipeline("toy")
    m, ims = measure(base, judge, args.subject, args.n, args.seed, args.sample_steps, identifier=None)
    result["models"]["base"] = dict(class_prompts=m)
    grids["base"] = ims
    for prior in (False, True):
        key = "prior" if prior else "no_prior"
        path, secs = run_job(args.subject, work / key, args.steps, prior, args.lr)
        pipe = models.load_pipeline(path)
        subj, ims_s = measure(pipe, judge, args.subject, args.n, args.seed, args.sample_steps, identifier="sks")
        cls_, ims_c = measure(pipe, judge, args.subject, args.n, args.seed, args.sample_steps, identifier=None)
        result["models"][key] = dict(run_seconds=round(secs, 1), subject_prompts=subj, class_prompts=cls_)
        grids[key] = {**ims_s, **ims_c}

    def mean(d, k):
        return sum(v[k] for v in d.values()) / len(d)

    n_pairs = len(tw.COLOUR_NAMES) * len(tw.PATTERNS)
    claims = {"fidelity_before": mean(result["models"]["base"]["class_prompts"], "subject")}
    for key in ("no_prior", "prior"):
        r = result["models"][key]
        claims[f"fidelity_{key}"] = mean(r["subject_prompts"], "subject")
        claims[f"recontext_{key}"] = mean(r["subject_prompts"], "scene")
        claims[f"pres_{key}"] = mean(r["class_prompts"], "subject")
        claims[f"div_{key}"] = mean(r["class_prompts"], "pairs") / n_pairs
    claims["div_base"] = mean(result["models"]["base"]["class_prompts"], "pairs") / n_pairs
    result["claims"] = claims
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    figure(grids, out.with_suffix(".png"))
    print(json.dumps(claims, indent=1))
    return result


def figure(grids: dict, path: Path, per: int = 4) -> None:
    """One row of `per` samples per (model, prompt)."""
    from PIL import Image, ImageDraw

    rows = [(f"{k}: {p}", ims[:per]) for k, g in grids.items() for p, ims in g.items()]
    S, label = tw.RESOLUTION * 2, 260
    im = Image.new("RGB", (label + per * S, len(rows) * S), "white")
    d = ImageDraw.Draw(im)
    for r, (text, ims) in enumerate(rows):
        d.text((4, r * S + S // 2 - 6), text, fill="black")
        for c, x in enumerate(ims):
            im.paste(x.resize((S, S)), (label + c * S, r * S))
    im.save(path)


if __name__ == "__main__":
    main()
