"""DreamBooth's claims, measured in the toy world (#13), through the product's own training path.

For a shipped toy-world subject (dreambooth_ray.toyworld.SUBJECTS, photos in jobs/toyworld-subjects/),
`dreambooth-ray run` fine-tunes the pretrained built-in `toy` model on jobs/quickstart.yaml, with the
prior-preservation loss and without it, for each method asked (full: the quickstart as written; lora:
the quickstart with `method: lora` and no learning rate, so the spec's LoRA default applies). The base
model and every fine-tuned model then sample the same prompts with the same seeds, and the toy-world
judge (a classifier of class, colour, pattern and scene, shipped in dreambooth_ray/assets/toy/
judge.safetensors) reads every sample. Each measure is taken at the bare prompt ("a sks toy", "a toy":
what a new user types first) and at scene prompts (beach, snow: scenes the subject's photos never show):

  fidelity        "a sks toy [in <scene>]": samples showing the subject (its class, colour and pattern);
                  the base model's "a toy [in <scene>]" is the before. colour / pattern: each alone.
  recontext       the scene samples: the prompted scene.
  pres            "a toy [in <scene>]" after fine-tuning: class samples that show the subject's colour and
                  pattern (the paper's PRES: language drift toward the subject; lower is better).
  colour_drift    the same class samples in the subject's colour, whatever their pattern.
  div             distinct (colour, pattern) pairs among those class samples / all 15 pairs (the paper's
                  DIV stand-in: output diversity of the class).
  judge           the judge's accuracy per attribute on held-out renders of the toy world's generator
                  (seed 4242: the judge trained on seed 1000, the toy model on seed 0), on the clean
                  renders and after a round trip through the toy model's VAE (blurred as samples are).

Writes benchmarks/results/toyworld.json and benchmarks/results/toyworld.png (rows: base, then each run;
columns: samples).

  python benchmarks/toyworld_claims.py [--methods full lora] [--variants prior no_prior] [--n 16]
      [--set train.steps=300 prior.num_class_images=64 prior.loss_weight=1.0]
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

SCENES = (None, "beach", "snow")  # None: the bare prompt; beach and snow are never in the subjects' photos
JUDGE_SEED = 4242  # held out: the judge trained on seed 1000 (tw.train_judge), the toy model on seed 0


def parse_sets(items: list[str]) -> dict:
    """["train.steps=300", ...] -> {"train.steps": 300, ...}; values are YAML (numbers, true, lists)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        out[key] = yaml.safe_load(value)
    return out


def job_spec(subject: str, storage: Path, method: str, prior: bool, sets: dict) -> dict:
    import yaml

    data = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    cls = tw.SUBJECTS[subject]["cls"]
    data.update(name=f"claims-{method}-{'prior' if prior else 'noprior'}", storage=str(storage))
    data["subject"] = dict(name=subject, images=str(ROOT / "jobs" / "toyworld-subjects" / subject), **{"class": cls},
                           identifier="sks")
    if method == "lora":  # the shipped LoRA defaults: the quickstart's learning rate is full fine-tuning's
        data["train"]["method"] = "lora"
        data["train"].pop("learning_rate", None)
        # what the quickstart trains, adapted: a trained text encoder becomes text-encoder adapters
        data["train"]["lora"] = {"text_encoder": bool(data["train"].pop("train_text_encoder", False))}
    data["prior"]["enabled"] = prior
    for key, value in sets.items():
        *path, last = key.split(".")
        node = data
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    # one checkpoint, one sample prompt, no validation passes: the claims sample the export themselves
    data["train"]["checkpoint_every"] = data["train"]["steps"]
    data["samples"] = dict(data["samples"], prompts=["a {identifier} {class_noun} on the beach"])
    data["samples"].pop("validation_every", None)
    return data


def run_job(data: dict, storage: Path) -> tuple[str, float]:
    import yaml

    from dreambooth_ray import cli

    spec = storage / "job.yaml"
    storage.mkdir(parents=True, exist_ok=True)
    spec.write_text(yaml.safe_dump(data))
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["run", str(spec)])
    if rc != 0:
        raise SystemExit(f"dreambooth-ray run {spec} failed (rc {rc})")
    out = storage / "outputs" / data["name"] / data["subject"]["name"]
    return str(out / ("lora" if data["train"].get("method") == "lora" else "model")), time.time() - t0


def load_export(path: str):
    """The export as a user loads it: a pipeline folder, or a LoRA adapter on the base model."""
    from dreambooth_ray import models

    if Path(path).name != "lora":
        return models.load_pipeline(path)
    pipe = models.load_pipeline("toy")
    pipe.load_lora_weights(path)
    return pipe


def measure(pipe, judge, subject: str, n: int, seed: int, steps: int, identifier: str | None) -> dict:
    import torch

    want = tw.SUBJECTS[subject]
    out, images = {}, {}
    for scene in SCENES:
        at = tw.Attrs(cls=want["cls"], colour=want["colour"], scene=scene or "plain")
        prompt = tw.caption(at, colour=False, scene=scene is not None, identifier=identifier)
        ims = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(seed)).images
        preds = tw.judge_predict(judge, ims)
        subj = [p["cls"] == want["cls"] and p["colour"] == want["colour"] and p["pattern"] == want["pattern"]
                for p in preds]
        out[prompt] = dict(subject=sum(subj) / n, cls=sum(p["cls"] == want["cls"] for p in preds) / n,
                           colour=sum(p["colour"] == want["colour"] for p in preds) / n,
                           pattern=sum(p["pattern"] == want["pattern"] for p in preds) / n,
                           pairs=len({(p["colour"], p["pattern"]) for p in preds}))
        if scene is not None:
            out[prompt]["scene"] = sum(p["scene"] == scene for p in preds) / n
        images[prompt] = ims
    return out, images


def judge_accuracy(judge, vae, subject: str, n: int, seed: int = JUDGE_SEED) -> dict:
    """Per attribute, on n held-out renders; 'instance' is class, colour and pattern all right (what
    fidelity and PRES count). 'vae': the same renders encoded and decoded by the toy model's VAE, whose
    blur the samples share (the judge never saw it in training)."""
    import numpy as np
    import torch

    imgs, _, labels = tw.batch_arrays(seed, n)
    with torch.no_grad():
        x = torch.from_numpy(imgs).float() / 127.5 - 1
        rt = vae.decode(vae.encode(x).latent_dist.mode()).sample
        rt = ((rt.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    out = {}
    for name, batch in (("clean", imgs), ("vae", rt)):
        preds = tw.judge_predict(judge, batch)
        ok = {k: np.array([tw.HEADS[k][labels[k][i]] == p[k] for i, p in enumerate(preds)]) for k in tw.HEADS}
        out[name] = {k: round(float(v.mean()), 4) for k, v in ok.items()}
        out[name]["instance"] = round(float((ok["cls"] & ok["colour"] & ok["pattern"]).mean()), 4)
    # the subject's class and colour in each pattern, through the VAE: is "striped" in a sample the judge
    # misreading dots?
    want = tw.SUBJECTS[subject]
    per = {}
    for pattern in tw.PATTERNS:
        trip = tw.sample(seed + 1, max(n // 5, 50), cls=want["cls"], colour=want["colour"], pattern=pattern)
        x = torch.from_numpy(np.stack([np.asarray(im).transpose(2, 0, 1) for _, im, _ in trip])).float() / 127.5 - 1
        with torch.no_grad():
            rt = vae.decode(vae.encode(x).latent_dist.mode()).sample
        preds = tw.judge_predict(judge, ((rt.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())
        per[pattern] = {q: round(sum(p["pattern"] == q for p in preds) / len(preds), 4) for q in tw.PATTERNS}
    out[f"vae_{want['colour']}_{want['cls']}_pattern_read_as"] = per
    return dict(seed=seed, n=n, **out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subject", default="toy-purple-dots", choices=sorted(tw.SUBJECTS))
    ap.add_argument("--methods", nargs="+", default=["full"], choices=("full", "lora"))
    ap.add_argument("--variants", nargs="+", default=["no_prior", "prior"], choices=("no_prior", "prior"))
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="overrides of the quickstart's spec for every run, e.g. train.steps=300 prior.loss_weight=2")
    ap.add_argument("--steps", type=int, default=None, help="train.steps (default: the quickstart's)")
    ap.add_argument("--n", type=int, default=16, help="samples per prompt")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge-n", type=int, default=1000, help="held-out renders for the judge's accuracy (0: skip)")
    ap.add_argument("--judge-only", action="store_true", help="measure the judge's accuracy and stop")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toyworld.json"))
    ap.add_argument("--work", default=None, help="storage root for the runs (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    from dreambooth_ray import models

    torch.set_num_threads(1)
    sets = parse_sets(args.set)
    if args.steps is not None:
        sets["train.steps"] = args.steps
    judge = tw.load_shipped_judge()
    base = models.load_pipeline("toy")
    result = dict(subject=args.subject, attrs=tw.SUBJECTS[args.subject], set=sets, n=args.n,
                  sample_steps=args.sample_steps, seed=args.seed, judge="dreambooth_ray/assets/toy/judge.safetensors")
    if args.judge_n:
        result["judge_accuracy"] = judge_accuracy(judge, base.vae, args.subject, args.judge_n)
        print(json.dumps(result["judge_accuracy"]))
    if args.judge_only:
        return result
    work = Path(args.work or tempfile.mkdtemp(prefix="toyworld-claims-")).resolve()  # the spec resolves paths from its folder
    result["models"], grids = {}, {}
    m, grids["base"] = measure(base, judge, args.subject, args.n, args.seed, args.sample_steps, identifier=None)
    result["models"]["base"] = dict(class_prompts=m)
    for method in args.methods:
        for variant in args.variants:
            # full fine-tuning keeps the unprefixed keys ("prior", "no_prior") earlier results used
            key = variant if method == "full" else f"{method}_{variant}"
            data = job_spec(args.subject, work / key, method, variant == "prior", sets)
            path, secs = run_job(data, work / key)
            pipe = load_export(path)
            subj, ims_s = measure(pipe, judge, args.subject, args.n, args.seed, args.sample_steps, identifier="sks")
            cls_, ims_c = measure(pipe, judge, args.subject, args.n, args.seed, args.sample_steps, identifier=None)
            result["models"][key] = dict(run_seconds=round(secs, 1), train=data["train"], prior=data["prior"],
                                         subject_prompts=subj, class_prompts=cls_)
            grids[key] = {**ims_s, **ims_c}

    n_pairs = len(tw.COLOUR_NAMES) * len(tw.PATTERNS)

    def split(d: dict) -> tuple[dict, list[dict]]:
        """(the bare prompt's measures, the scene prompts' measures)"""
        bare = [v for v in d.values() if "scene" not in v]
        return bare[0], [v for v in d.values() if "scene" in v]

    def mean(rows, k):
        return sum(r[k] for r in rows) / len(rows)

    bare, scenes = split(result["models"]["base"]["class_prompts"])
    claims = {"fidelity_before": mean(scenes, "subject"), "fidelity_before_bare": bare["subject"],
              "colour_base": mean(scenes, "colour"), "colour_base_bare": bare["colour"],
              "div_base": mean(scenes, "pairs") / n_pairs, "div_base_bare": bare["pairs"] / n_pairs}
    for key, r in result["models"].items():
        if key == "base":
            continue
        sb, ss = split(r["subject_prompts"])
        cb, cs = split(r["class_prompts"])
        claims.update({f"fidelity_{key}": mean(ss, "subject"), f"fidelity_bare_{key}": sb["subject"],
                       f"colour_bare_{key}": sb["colour"], f"pattern_bare_{key}": sb["pattern"],
                       f"recontext_{key}": mean(ss, "scene"),
                       f"pres_{key}": mean(cs, "subject"), f"pres_bare_{key}": cb["subject"],
                       # the colour alone: drift PRES misses when the class takes the subject's colour, not its pattern
                       f"colour_drift_{key}": mean(cs, "colour"), f"colour_drift_bare_{key}": cb["colour"],
                       f"div_{key}": mean(cs, "pairs") / n_pairs, f"div_bare_{key}": cb["pairs"] / n_pairs})
    result["claims"] = claims
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    figure(grids, out.with_suffix(".png"))
    print(json.dumps(claims, indent=1))
    return result


def figure(grids: dict, path: Path, per: int = 8) -> None:
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
