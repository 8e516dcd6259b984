"""Masked loss in the toy world (#34 item 4): is a background in all the photos learned as the subject?

Five photos of one shipped toy-world subject (toy-purple-dots: class, colour, pattern, ear shape fixed;
position, size and city skyline varying), all in the city scene, are written twice: once with a mask per photo
(masks/<name>: the subject's silhouette and its dark outline, from toyworld's own drawing, box-filtered as the
photo is, so edges are grey) and once without. `dreambooth-ray run` fine-tunes the pretrained `toy` model on
each, with the settings toyworld_claims.py uses (jobs/quickstart.yaml: full fine-tuning, text encoder trained,
prior preservation with 16 class images, lr 2e-4, 150 steps), the masked run with `train.masked_loss: on` so a
missing mask would fail it. Nothing else differs. Each export (and the base model, as the reference) then
samples, with the same seeds,

  "a sks toy on the beach"   beach: samples the judge reads as beach (the asked scene);
                             city: samples it reads as city (the photos' background, carried over)
  "a sks toy in the city"    the control: both variants should draw the city
  "a sks toy"                subject fidelity: class, colour and pattern all the subject's; colour alone;
                             and city: the bare prompt's scene, where the photos' background shows most

and the toy-world judge (dreambooth_ray/assets/toy/judge.safetensors; its scene accuracy through the toy VAE is
in benchmarks/results/toyworld.json) reads each sample. Writes benchmarks/results/toyworld_masks.json and .png.

  python benchmarks/toyworld_masks.py [--n 64] [--steps 150] [--seeds 0 1 2] [--set prior.loss_weight=1.0]
  (the defaults wrote benchmarks/results/toyworld_masks.*: 6 runs, 459 s on the 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dreambooth_ray import toyworld as tw  # noqa: E402
from toyworld_claims import figure, job_spec, load_export, parse_sets, run_job  # noqa: E402

SUBJECT = "toy-purple-dots"
SCENE = "city"  # the background of every photo
PROMPTS = {"beach": "beach", "city": "city", "bare": None}  # key -> scene phrase in the prompt


def city_photos(name: str, n: int, seed: int = 0) -> list[tuple]:
    """n (attrs, photo, mask) of the subject, every one in the city (toyworld.subject_photos cycles scenes).
    The mask is what render() paints the object over: the silhouette grown by the outline, box-filtered
    to the photo's resolution as the photo is."""
    from PIL import Image, ImageFilter

    rng = tw.random.Random(f"subject-{name}-{SCENE}-{seed}")
    S = tw.RESOLUTION * tw._SS
    out = []
    for _ in range(n):
        a = tw.random_attrs(rng, **tw.SUBJECTS[name], scene=SCENE)
        m, _ = tw._shape_mask(a, S)
        m = m.filter(ImageFilter.MaxFilter(2 * (tw._SS // 2) + 1)).resize((tw.RESOLUTION,) * 2, Image.BOX)
        out.append((a, tw.render(a), m))
    return out


def write_photos(folder: Path, photos, masks: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (_, im, m) in enumerate(photos):
        im.save(folder / f"{SUBJECT}_{i:02d}.png")
        if masks:
            (folder / "masks").mkdir(exist_ok=True)
            m.save(folder / "masks" / f"{SUBJECT}_{i:02d}.png")


def measure(pipe, judge, n: int, seed: int, steps: int, identifier: str | None) -> tuple[dict, dict]:
    import torch

    want = tw.SUBJECTS[SUBJECT]
    out, images = {}, {}
    for key, scene in PROMPTS.items():
        at = tw.Attrs(cls=want["cls"], colour=want["colour"], scene=scene or "plain")
        prompt = tw.caption(at, colour=False, scene=scene is not None, identifier=identifier)
        ims = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=7.5,
                   generator=torch.Generator().manual_seed(seed)).images
        preds = tw.judge_predict(judge, ims)
        with torch.no_grad():  # the judge's mean scene probabilities: remnants too faint to flip its argmax
            prob = judge(tw.judge_input(ims))["scene"].softmax(-1).mean(0).tolist()
        rate = lambda f: round(sum(map(f, preds)) / n, 4)  # noqa: E731
        out[key] = dict(prompt=prompt, beach=rate(lambda p: p["scene"] == "beach"),
                        city=rate(lambda p: p["scene"] == "city"),
                        scenes={s: rate(lambda p, s=s: p["scene"] == s) for s in tw.SCENES},
                        subject=rate(lambda p: all(p[k] == want[k] for k in ("cls", "colour", "pattern"))),
                        colour=rate(lambda p: p["colour"] == want["colour"]),
                        cls=rate(lambda p: p["cls"] == want["cls"]),
                        p_scene={sc: round(v, 4) for sc, v in zip(tw.SCENES, prob)})
        images[f"{key}: {prompt}"] = ims
    return out, images


def se(p: float, n: int) -> float:
    return round(math.sqrt(max(p * (1 - p), 1 / n) / n), 4)  # binomial standard error (floored at p = 1/n)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="samples per prompt")
    ap.add_argument("--photos", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="train.steps (default: the quickstart's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of each pair of runs")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--sample-seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toyworld_masks.json"))
    ap.add_argument("--work", default=None, help="storage root (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    from dreambooth_ray import models

    torch.set_num_threads(1)
    t_start = time.time()
    sets = parse_sets(args.set)
    if args.steps is not None:
        sets["train.steps"] = args.steps
    work = Path(args.work or tempfile.mkdtemp(prefix="toyworld-masks-")).resolve()
    photos = city_photos(SUBJECT, args.photos)
    for variant in ("masked", "unmasked"):
        write_photos(work / "photos" / variant, photos, masks=variant == "masked")
    judge = tw.load_shipped_judge()
    photo_scenes = [p["scene"] for p in tw.judge_predict(judge, [im for _, im, _ in photos])]
    base = models.load_pipeline("toy")
    result = dict(subject=SUBJECT, attrs=tw.SUBJECTS[SUBJECT], photos=args.photos, photo_scene=SCENE,
                  photo_scenes_judged=photo_scenes,
                  mask_share=[round(float(sum(m.getdata())) / 255 / tw.RESOLUTION ** 2, 4) for _, _, m in photos],
                  set=sets, n=args.n, sample_steps=args.sample_steps, sample_seed=args.sample_seed,
                  judge="dreambooth_ray/assets/toy/judge.safetensors", runs={})
    m, ims = measure(base, judge, args.n, args.sample_seed, args.sample_steps, identifier=None)
    result["base"] = m
    grids = {"photos": {"the photos": [im for _, im, _ in photos]},
             "masks": {"their masks (masked run)": [m.convert("RGB") for _, _, m in photos]}, "base": ims}
    for seed in args.seeds:
        for variant in ("masked", "unmasked"):
            key = f"{variant}_seed{seed}"
            data = job_spec(SUBJECT, work / key, "full", True, {**sets, "train.seed": seed,
                            "train.masked_loss": "on" if variant == "masked" else "auto"})
            data["name"] = f"masks-{key}"
            data["subject"]["images"] = str(work / "photos" / variant)
            path, secs = run_job(data, work / key)
            m, ims = measure(load_export(path), judge, args.n, args.sample_seed, args.sample_steps, identifier="sks")
            job = json.loads((Path(path).parent / "job.json").read_text()) if (Path(path).parent / "job.json").exists() else {}
            result["runs"][key] = dict(variant=variant, train_seed=seed, run_seconds=round(secs, 1),
                                       train=data["train"], prior=data["prior"], measures=m,
                                       job_masks=job.get("masks"))
            grids[key] = ims
            print(key, json.dumps({k: {q: v[q] for q in ("beach", "city", "subject", "colour")} for k, v in m.items()}),
                  flush=True)
            write(result, grids, Path(args.out), t_start)  # after every run: a cut-short measurement keeps its runs
    print(json.dumps(result["summary"], indent=1))
    return result


def write(result: dict, grids: dict, out: Path, t_start: float) -> None:
    """Per variant, pooled over the finished runs' training seeds (each samples the same n seeds)."""
    n = result["n"]
    summary = {}
    for variant in ("masked", "unmasked"):
        rows = [r["measures"] for r in result["runs"].values() if r["variant"] == variant]
        if not rows:
            continue
        N = n * len(rows)
        pool = lambda k, q: round(sum(r[k][q] for r in rows) / len(rows), 4)  # noqa: E731
        s = {"beach_on_beach": pool("beach", "beach"), "city_on_beach": pool("beach", "city"),
             "city_on_city": pool("city", "city"), "city_on_bare": pool("bare", "city"),
             "subject_bare": pool("bare", "subject"), "colour_bare": pool("bare", "colour"),
             "subject_beach": pool("beach", "subject"), "n_per_prompt": N}
        s["se"] = {k: se(v, N) for k, v in s.items() if k != "n_per_prompt"}
        s["p_city_on_beach"] = round(sum(r["beach"]["p_scene"]["city"] for r in rows) / len(rows), 4)
        s["p_city_on_bare"] = round(sum(r["bare"]["p_scene"]["city"] for r in rows) / len(rows), 4)
        summary[variant] = s
    result["summary"] = summary
    result["seconds"] = round(time.time() - t_start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    figure(grids, out.with_suffix(".png"), per=12)
    write_md(result, out.with_suffix(".md"))


def write_md(result: dict, path: Path) -> None:
    cols = ("beach_on_beach", "city_on_beach", "p_city_on_beach", "city_on_city", "city_on_bare", "p_city_on_bare",
            "subject_bare", "colour_bare", "subject_beach")
    lines = [f"# Masked loss in the toy world (benchmarks/toyworld_masks.py, {result['subject']}, "
             f"{result['photos']} photos all in the {result['photo_scene']}, n={result['n']} per prompt per run)", "",
             "Per variant, pooled over training seeds " + str(sorted({r['train_seed'] for r in result['runs'].values()}))
             + "; +- is the binomial standard error. p_city: the judge's mean city probability.", "",
             "| variant | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for v, s in result["summary"].items():
        lines.append(f"| {v} | " + " | ".join(f"{s[c]:.3f}" + (f" +-{s['se'][c]:.3f}" if c in s["se"] else "")
                                             for c in cols) + " |")
    lines += ["", "| run | secs | " + " | ".join(f"{k}: beach / city / subject" for k in PROMPTS) + " |",
              "|---|---|" + "---|" * len(PROMPTS)]
    for key, r in [("base", dict(measures=result["base"], run_seconds="-"))] + list(result["runs"].items()):
        m = r["measures"]
        lines.append(f"| {key} | {r['run_seconds']} | " + " | ".join(
            f"{m[k]['beach']:.3f} / {m[k]['city']:.3f} / {m[k]['subject']:.3f}" for k in PROMPTS) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
