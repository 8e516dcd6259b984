"""The paper's evaluation: metric arithmetic on constructed cases, tiny random metric models loaded
from a folder and from S3, and `dreambooth-ray eval` on a finished job (rendered on Ray actors)."""

import json

import fsspec
import pytest
import torch
import yaml
from PIL import Image

from dreambooth_ray import cli, eval as ev, models, tiny
from dreambooth_ray.spec import EvalConfig, S3Settings, Subject, load_spec, parse_spec

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
    assert -1 <= r["metrics"]["dino"] < 1 and -1 <= r["metrics"]["clip_i"] < 1
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
    spec_file.write_text(yaml.safe_dump(tiny_spec(str(tmp_path / "store"), str(toy_images))))
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
    assert all(-1 <= m[k] <= 1 for k in ("dino", "clip_i", "clip_t", "pres")) and m["div"] >= 0
    assert [p["prompt"] for p in report["per_prompt"]] == ["a toy on the beach", "a red toy"]
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"] == m
    assert Image.open(run_dir / "grid.png").size[0] == 2 * 192  # first image of each prompt

    # Re-running renders nothing new and gives the same numbers (fixed seeds, stored images).
    data = quickstart.data
    again = ev.evaluate(load_spec(quickstart.spec_file))[0]
    assert again["rendered"] == 0 and again["cached"] == 6 and again["metrics"] == m
    # Asking for more images per prompt renders only the new ones, into the same folder.
    more = ev.evaluate(parse_spec({**data, "eval": {**data["eval"], "images_per_prompt": 3}}))[0]
    assert more["rendered"] == 2 and more["cached"] == 6 and [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]
