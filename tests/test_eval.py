"""The paper's evaluation: metric arithmetic on constructed cases, tiny random metric models loaded
from a folder and from S3, and `dreambooth-ray eval` on a finished job (rendered on Ray actors)."""

import json

import fsspec
import pytest
import torch
import yaml
from PIL import Image

from dreambooth_ray import cli, eval as ev, models, tiny
from dreambooth_ray.settings import S3Settings
from dreambooth_ray.spec import EvalConfig, Subject, load_spec, parse_spec

from conftest import tiny_spec


def test_cosine_and_distance_arithmetic_on_constructed_cases():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert ev.mean_cosine(a, a * 3) == pytest.approx(0.5)  # diagonal 1, off-diagonal 0
    assert ev.mean_cosine(a[:1], a[:1] * 5) == pytest.approx(1.0)
    assert ev.mean_cosine(a[:1], a[1:]) == pytest.approx(0.0)
    assert ev.mean_cosine(a[:1], -a[:1]) == pytest.approx(-1.0)

    x = [torch.randn(16, 8), torch.randn(4, 32)]
    assert ev.perceptual_distance(x, [t.clone() for t in x]) == 0.0
    assert ev.perceptual_distance(x, [t * 7 for t in x]) == pytest.approx(0.0, abs=1e-12)  # unit-normalised
    # Opposite features at every position: |u - (-u)|^2 = 4.
    assert ev.perceptual_distance(x, [-t for t in x]) == pytest.approx(4.0)
    same = [torch.stack([t, t, t]) for t in x]
    assert ev.mean_pairwise_distance(same) == 0.0
    assert ev.mean_pairwise_distance([t[:1] for t in same]) is None  # one image: no pairs
    mixed = [torch.stack([t, -t]) for t in x]
    assert ev.mean_pairwise_distance(mixed) == pytest.approx(4.0)


def test_the_papers_prompt_sets():
    assert len(ev.OBJECT_PROMPTS) == len(ev.LIVE_PROMPTS) == 25
    assert len(set(ev.OBJECT_PROMPTS) & set(ev.LIVE_PROMPTS)) == 15  # 10 contexts + 5 properties shared
    dog = Subject(name="d", images="x", **{"class": "dog"}, identifier="sks")
    pack = Subject(name="b", images="x", **{"class": "backpack"}, identifier="sks")
    assert ev.templates(EvalConfig(), dog) == ev.LIVE_PROMPTS
    assert ev.templates(EvalConfig(), pack) == ev.OBJECT_PROMPTS
    assert ev.templates(EvalConfig(prompts="live"), pack) == ev.LIVE_PROMPTS
    assert "a sks dog wearing a santa hat" in [dog.prompt(t) for t in ev.LIVE_PROMPTS]
    assert ev.clip_text("a {identifier} {class_noun} in the jungle", dog) == "a dog in the jungle"
    assert ev.clip_text("a cube shaped {identifier} {class_noun}", dog) == "a cube shaped dog"
    prompts, pres = ev.plan(EvalConfig(images_per_prompt=3, class_images=2), dog)
    names = [r.name for _, rs in prompts for r in rs] + [r.name for r in pres]
    seeds = [r.seed for _, rs in prompts for r in rs] + [r.seed for r in pres]
    assert len(names) == len(set(names)) == len(set(seeds)) == 25 * 3 + 2
    assert {r.prompt for r in pres} == {"a dog"}
    with pytest.raises(Exception, match="unknown placeholder"):
        EvalConfig(prompts=("a {subject}",))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all (row of a, row of b) pairs, pair by pair."""
    return sum(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0).item() for x in a for y in b) / (
        len(a) * len(b))


def _by_hand(m, real, generated, class_images) -> dict:
    """The paper's metrics from the metric models' features, with the arithmetic written out here: DINO and
    CLIP-I mean cosine to the real images, CLIP-T to the prompt's text embedding, PRES the class images'
    DINO cosine to the real images, DIV the mean over image pairs and DINO layers of LPIPS's formula
    (per-position unit vectors, squared distance summed over channels, mean over positions)."""
    real_dino, real_clip = m.dino_features(real)[0], m.clip_images(real)
    per_prompt = []
    for text, ims in generated:
        dino, layers = m.dino_features(ims)
        clip = m.clip_images(ims)
        pairs = [(i, j) for i in range(len(ims)) for j in range(i + 1, len(ims))]
        div = [sum(((a[i] / a[i].norm(dim=-1, keepdim=True) - a[j] / a[j].norm(dim=-1, keepdim=True)) ** 2)
                   .sum(-1).mean().item() for a in (t.double() for t in layers)) / len(layers) for i, j in pairs]
        per_prompt.append({"dino": _cos(dino, real_dino), "clip_i": _cos(clip, real_clip),
                           "clip_t": _cos(clip, m.clip_texts([text])), "div": sum(div) / len(div) if div else None})
    metrics = {k: sum(p[k] for p in per_prompt if p[k] is not None) / sum(p[k] is not None for p in per_prompt)
               for k in ("dino", "clip_i", "clip_t", "div")}
    metrics["pres"] = _cos(m.dino_features(class_images)[0], real_dino) if class_images else None
    return {"metrics": metrics, "per_prompt": per_prompt}


def _assert_same_metrics(report: dict, expected: dict, rel: float) -> None:
    pairs = [(report["metrics"], expected["metrics"])] + list(zip(report["per_prompt"], expected["per_prompt"], strict=True))
    for got, want in pairs:
        for k, v in want.items():
            assert got[k] == (None if v is None else pytest.approx(v, rel=rel, abs=1e-12)), k


@pytest.fixture(scope="module")
def metric_models():
    return ev.MetricModels("tiny-dino", "tiny-clip")


def test_identical_images_score_one_and_clip_t_matches_clips_own_logits(metric_models, toy_images):
    m = metric_models
    real = [Image.open(p).convert("RGB") for p in sorted(toy_images.iterdir())]
    r = ev.score(m, real[:1], [("a toy", [real[0]] * 3)], [real[0]])
    assert r["metrics"]["dino"] == pytest.approx(1.0)
    assert r["metrics"]["clip_i"] == pytest.approx(1.0)
    assert r["metrics"]["pres"] == pytest.approx(1.0)
    assert r["metrics"]["div"] == pytest.approx(0.0, abs=1e-9)  # three identical images: no diversity

    r = ev.score(m, real[:2], [("a red toy", real[2:4]), ("a toy on the beach", real[:1])], [])
    assert r["metrics"]["pres"] is None
    assert r["metrics"]["div"] == pytest.approx(r["per_prompt"][0]["div"]) and r["metrics"]["div"] > 0
    # Same features, float64 arithmetic in another order: equal to 1e-9 relative.
    _assert_same_metrics(r, _by_hand(m, real[:2], [("a red toy", real[2:4]), ("a toy on the beach", real[:1])], []),
                         rel=1e-9)
    # CLIP-T against CLIP's own forward pass: logits_per_image / logit_scale is the cosine similarity.
    inputs = m.clip_processor(text=["a red toy"], images=real[2:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = m.clip(**inputs)
    expected = (out.logits_per_image / m.clip.logit_scale.exp()).mean().item()
    assert r["per_prompt"][0]["clip_t"] == pytest.approx(expected, abs=1e-5)


def test_metric_models_load_from_s3_like_from_a_folder(s3_endpoint, bucket, metric_models, toy_images, tmp_path):
    s3 = S3Settings(endpoint_url=s3_endpoint)
    fs = fsspec.filesystem("s3", endpoint_url=s3_endpoint)
    for name in ("tiny-dino", "tiny-clip"):
        fs.put(str(tiny.materialize(None, name)) + "/", f"{bucket}/metrics/{name}/", recursive=True)
    remote = ev.MetricModels(f"s3://{bucket}/metrics/tiny-dino", f"s3://{bucket}/metrics/tiny-clip", s3)
    im = [Image.open(p).convert("RGB") for p in sorted(toy_images.iterdir())]
    assert torch.equal(remote.dino_features(im)[0], metric_models.dino_features(im)[0])
    assert torch.equal(remote.clip_images(im), metric_models.clip_images(im))
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelError, match="empty.*config.json"):
        ev.MetricModels(str(tmp_path / "empty"), "tiny-clip")
    with pytest.raises(models.ModelError, match="nothing-here.*config.json"):
        ev.MetricModels(f"s3://{bucket}/nothing-here", "tiny-clip", s3)


def test_eval_before_training_is_a_clear_error(ray_cluster, tmp_path, toy_images, capsys):
    spec_file = tmp_path / "job.yaml"
    # Metric models on this machine: the default hub ids would spend ~45 s in timeouts with no network.
    spec_file.write_text(yaml.safe_dump(tiny_spec(str(tmp_path / "store"), str(toy_images),
                                                  eval={"dino": "tiny-dino", "clip": "tiny-clip"})))
    assert cli.main(["eval", str(spec_file)]) == 2
    assert "subject 'toy' has no finished training" in capsys.readouterr().err
    assert not (tmp_path / "store" / "outputs").exists()  # nothing rendered


def test_eval_command_on_the_finished_quickstart(quickstart, capsys):
    # The quickstart's job spec carries an `eval:` section on the tiny metric models (see conftest).
    assert quickstart.rc == 0
    assert cli.main(["eval", str(quickstart.spec_file)]) == 0
    printed = capsys.readouterr().out
    assert "toy" in printed and "CLIP-T" in printed
    job_dir = quickstart.store / "outputs" / "quickstart"
    report = json.loads((job_dir / "eval.json").read_text())["subjects"][0]
    assert report["identifier"] == "sks" and report["rendered"] == 2 * 2 + 2 and report["cached"] == 0
    (run_dir,) = (job_dir / "toy" / "eval").iterdir()
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == [
        "class-000.png", "class-001.png", "p00-000.png", "p00-001.png", "p01-000.png", "p01-001.png"]
    m = report["metrics"]
    assert [p["prompt"] for p in report["per_prompt"]] == ["a toy on the beach", "a red toy"]
    # The numbers, recomputed from the stored images: the trained subject's renders per prompt (scored against
    # the prompt without the identifier), the class-prompt renders, and the subject's photos as training saw them.
    from dreambooth_ray.images import load_subject_images

    spec = load_spec(quickstart.spec_file)
    stored = lambda name: Image.open(run_dir / "images" / name).convert("RGB")  # noqa: E731
    real = [s.image for s in load_subject_images(spec.subjects[0].images, spec.train.resolution)]
    generated = [(text, [stored(f"p{i:02d}-{j:03d}.png") for j in range(2)])
                 for i, text in enumerate(["a toy on the beach", "a red toy"])]
    # The eval's float32 features came from another process (the Ray scoring task) in other batches: measured
    # 6e-9 relative apart from these, so 1e-6.
    _assert_same_metrics(report, _by_hand(ev.MetricModels("tiny-dino", "tiny-clip"), real, generated,
                                          [stored("class-000.png"), stored("class-001.png")]), rel=1e-6)
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"] == m
    assert Image.open(run_dir / "grid.png").size[0] == 2 * 192  # first image of each prompt

    # Re-running renders nothing new and gives the same numbers (fixed seeds, stored images).
    data = quickstart.data
    again = ev.evaluate(load_spec(quickstart.spec_file))[0]
    assert again["rendered"] == 0 and again["cached"] == 6 and again["metrics"] == m
    # Asking for more images per prompt renders only the new ones, into the same folder.
    more = ev.evaluate(parse_spec({**data, "eval": {**data["eval"], "images_per_prompt": 3}}))[0]
    assert more["rendered"] == 2 and more["cached"] == 6 and [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]


def test_eval_on_the_toy_metric_models_shows_the_quickstart_learned_its_subject(quickstart):
    """`eval` with toy-dino and toy-clip on the trained quickstart (the pretrained `toy` model taught a
    purple dotted toy): subject fidelity against the base model's renders of the same prompts with the
    same seeds, scored by the same metric models; the prompted scenes (never in the photos) are drawn."""
    from dreambooth_ray.images import load_subject_images

    data = quickstart.data
    spec = parse_spec({**data, "eval": {
        "prompts": ["a {identifier} {class_noun} on the beach", "a {identifier} {class_noun} in the snow"],
        "images_per_prompt": 6, "class_images": 0, "inference_steps": 25, "batch_size": 6, "num_actors": 2,
        "dino": "toy-dino", "clip": "toy-clip"}})
    after = ev.evaluate(spec)[0]

    m = ev.metric_models("toy-dino", "toy-clip")
    prompts, _ = ev.plan(spec.eval, spec.subjects[0])
    base = models.prepare_sampler(models.load_pipeline(data["model"]), "cpu")
    generated = [(text, models.generate(base, [r.prompt for r in rs], height=32, width=32, num_inference_steps=25,
                                        guidance_scale=spec.eval.guidance_scale,
                                        generator=[torch.Generator().manual_seed(r.seed) for r in rs]))
                 for text, rs in prompts]
    real = [s.image for s in load_subject_images(spec.subjects[0].images, 32)]
    before = ev.score(m, real, generated, [])["metrics"]
    # Measured (this fixed draw): toy-dino 0.60 before, 0.97 after; CLIP-I 0.44 -> 0.72; CLIP-T 1.00 after (the
    # class and the prompted scene in every image). The margin sits about half-way; the floor is 3 of 4 images.
    assert after["metrics"]["dino"] >= before["dino"] + 0.2, (before, after["metrics"])
    assert after["metrics"]["clip_i"] >= before["clip_i"] + 0.15, (before, after["metrics"])
    assert after["metrics"]["clip_t"] >= 0.75, after["metrics"]
