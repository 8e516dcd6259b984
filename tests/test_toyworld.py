"""The toy world (dreambooth_ray/toyworld.py) and the pretrained `toy` model built on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dreambooth_ray import toyworld as tw

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = tw.assets_dir() / "pipeline" / "model_index.json"
needs_weights = pytest.mark.skipif(not SHIPPED.exists(), reason="toy weights not shipped yet")


def _pixels(trip):
    return [np.asarray(im).tobytes() for _, im, _ in trip]


def test_generator_is_deterministic_and_seeded():
    a, b, c = tw.sample(3, 6), tw.sample(3, 6), tw.sample(4, 6)
    assert _pixels(a) == _pixels(b) and [x[2] for x in a] == [x[2] for x in b]
    assert _pixels(a) != _pixels(c)
    for attrs, im, cap in a:
        assert im.size == (tw.RESOLUTION, tw.RESOLUTION) and im.mode == "RGB"
        assert cap.startswith("a ") and attrs.cls in cap.split()
    # render is a pure function of the attributes; attributes change the picture
    attrs = a[0][0]
    assert np.array_equal(np.asarray(tw.render(attrs)), np.asarray(a[0][1]))
    other = tw.Attrs(**{**attrs.to_dict(), "colour": "blue" if attrs.colour != "blue" else "red"})
    assert not np.array_equal(np.asarray(tw.render(other)), np.asarray(a[0][1]))


def test_caption_grammar():
    at = tw.Attrs(cls="dog", colour="red", scene="snow")
    assert tw.caption(at) == "a red dog in the snow"
    assert tw.caption(at, colour=False, scene=False) == "a dog"
    assert tw.caption(tw.Attrs(cls="toy", colour="red", scene="beach"), identifier="sks") == "a sks red toy on the beach"


def test_vocabulary_is_one_token_a_word_in_the_toy_tokenizer(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pretrain_toy import write_toy_tokenizer
    from transformers import CLIPTokenizer

    write_toy_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    # classes, colours and scene nouns are one token each; the plain scene's phrase ("on a plain
    # background") is several byte-pair pieces, which is fine: it is one fixed phrase
    for word in set(tw.vocabulary()) - {"plain", "background"} | {"sks"}:
        assert tok.tokenize(word) == [word + "</w>"], word
    # prompts fit the 16-token context; "... on a plain background" loses its last pieces (and the end
    # token) to truncation, identically in pretraining and sampling, and "plain" itself survives
    for at, _, _ in tw.sample(0, 50):
        ids = tok(tw.caption(at, colour=True, scene=True, identifier="sks"), truncation=True).input_ids
        assert len(ids) <= tok.model_max_length
        if at.scene != "plain":
            assert ids[-1] == tok.eos_token_id
        else:
            assert "in</w>" in tok.convert_ids_to_tokens(ids)


def test_pretrain_script_short_run_makes_a_loadable_pipeline(tmp_path):
    """A ~30 s run of benchmarks/pretrain_toy.py: every stage runs and the folder loads by from_pretrained."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from diffusers import StableDiffusionPipeline
    from pretrain_toy import main

    report = main(["--minutes", "0.1", "--judge-seconds", "2", "--data", "200", "--eval-samples", "0",
                   "--threads", "1", "--out", str(tmp_path)])
    assert report["unet_steps"] >= 1 and report["vae_steps"] >= 1
    assert json.loads((tmp_path / "pretrain.json").read_text())["seed"] == 0
    assert (tmp_path / "judge.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipeline"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red toy on the beach"], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (tw.RESOLUTION, tw.RESOLUTION)
    assert pipe.tokenizer.model_max_length == 16


@needs_weights
def test_shipped_weights_are_small_and_safetensors():
    files = [p for p in tw.assets_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20e6
    weights = [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert not weights, weights
    for part in ("unet", "vae", "text_encoder"):
        assert list((tw.assets_dir() / "pipeline" / part).glob("*.safetensors")), part


@needs_weights
def test_shipped_judge_recognises_the_toy_world():
    acc = tw.judge_accuracy(tw.load_shipped_judge(), seed=12345, n=300)
    assert min(acc.values()) >= 0.95, acc


@needs_weights
def test_toy_is_a_built_in_model_loaded_like_any_folder(tmp_path, monkeypatch):
    from dreambooth_ray import models, tiny

    monkeypatch.setenv("DREAMBOOTH_RAY_CACHE", str(tmp_path))
    path = Path(models.resolve("toy"))
    assert path.parent == tmp_path / "models" and (path / "model_index.json").exists()
    assert models.identity("toy") == tiny.TOY_VERSION
    pipe = models.load_pipeline("toy")
    assert type(pipe).__name__ == "StableDiffusionPipeline"


@needs_weights
def test_base_model_is_competent():
    """Prompts naming a class, a colour and a scene: the judge recognises each in most samples.
    The issue's bar is 80% for each; the threshold here sits below the shipped model's measured rates
    (assets/toy/pretrain.json) by a margin for the smaller sample."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from pretrain_toy import competence

    res = competence(tw.assets_dir() / "pipeline", tw.load_shipped_judge(), n=40, seed=7)
    for k in ("cls", "colour", "scene"):
        assert res[k] >= COMPETENCE_FLOOR[k], res


# The bar (80% each). Measured on the shipped weights, this test's draw (n=40, seed 7): class 1.00,
# colour 1.00, scene 0.925; pretrain_toy.py's own draw (n=50, seed 0, assets/toy/pretrain.json): class
# 1.00, colour 0.86, scene 0.96. Random weights score about 1/4, 1/5, 1/5.
COMPETENCE_FLOOR = {"cls": 0.8, "colour": 0.8, "scene": 0.8}


@needs_weights
def test_dreambooth_learns_the_subject_and_prior_preservation_limits_drift(ray_cluster, tmp_path):
    """benchmarks/toyworld_claims.py through `dreambooth-ray run` (the quickstart, with and without the
    prior; two 150-step runs). CPU training is deterministic, so these are the measured values of
    benchmarks/results/toyworld.json (n=16): before 0.00; with the prior, "a sks toy" 0.875 (its dots
    0.875), on the beach/snow 0.97, scene drawn 0.84; without, 0.69, 0.78, 0.56. "a toy": PRES 0.00 with
    the prior, 0.75 without (scenes 0.00 / 0.91), purple 0.00 / 1.00. Margins sit about half-way, so the
    test fails when fine-tuning stops learning or the prior loss stops working."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from toyworld_claims import main

    c = main(["--methods", "full", "--n", "16", "--judge-n", "0", "--out", str(tmp_path / "toyworld.json"),
              "--work", str(tmp_path / "work")])["claims"]
    # The subject, at the bare prompt and in new scenes: its class, colour and pattern
    assert c["fidelity_bare_prior"] >= c["fidelity_before_bare"] + 0.5 and c["pattern_bare_prior"] >= 0.5, c
    assert c["fidelity_prior"] >= c["fidelity_before"] + 0.5 and c["fidelity_no_prior"] >= c["fidelity_before"] + 0.4, c
    assert c["recontext_prior"] >= 0.6 and c["recontext_prior"] >= c["recontext_no_prior"] + 0.15, c
    # The class keeps its prior at the bare prompt and in scenes: no drift to the subject, nor to its colour
    assert c["pres_bare_prior"] <= c["pres_bare_no_prior"] - 0.4 and c["pres_prior"] <= c["pres_no_prior"] - 0.5, c
    assert c["colour_drift_bare_prior"] <= c["colour_drift_bare_no_prior"] - 0.5, c


@needs_weights
def test_lora_at_its_default_learning_rate_learns_the_subject_in_new_scenes(ray_cluster, tmp_path):
    """The quickstart as LoRA at the shipped defaults (rank 4, lr 1e-4, text-encoder adapters for the
    quickstart's trained text encoder), with the prior. Measured (toyworld.json): "a sks toy" on the
    beach/snow 0.44 (at the old default 5e-6: 0.09), scene drawn 1.00, PRES 0.06, purple "a toy" 0.06.
    At the bare prompt it reaches 0.125 only: not claimed (see the README)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from toyworld_claims import main

    c = main(["--methods", "lora", "--variants", "prior", "--n", "16", "--judge-n", "0",
              "--out", str(tmp_path / "toyworld.json"), "--work", str(tmp_path / "work")])["claims"]
    assert c["fidelity_lora_prior"] >= c["fidelity_before"] + 0.25, c
    assert c["recontext_lora_prior"] >= 0.75, c
    assert c["pres_lora_prior"] <= 0.25 and c["colour_drift_bare_lora_prior"] <= 0.25, c


@needs_weights
def test_toy_clip_t_is_the_share_of_the_prompts_attributes_the_image_shows():
    """toy-clip's CLIP-T on clean renders, against the share computed from the attributes they were drawn
    with (the judge reads clean renders without error: measured 0 of 120 mismatches on this draw)."""
    from dreambooth_ray import eval as ev

    m = ev.metric_models("toy-dino", "toy-clip")
    trip = tw.sample(5, 40)
    feats = m.clip_images([im for _, im, _ in trip])
    for (a, _, cap), f in zip(trip, feats):
        for text, named in (("a red dog in the snow", dict(cls="dog", colour="red", scene="snow")),
                            ("a blue toy on the beach", dict(cls="toy", colour="blue", scene="beach")),
                            ("a cup", dict(cls="cup")), (cap, dict(cls=a.cls, colour=a.colour, scene=a.scene))):
            truth = sum(getattr(a, k) == v for k, v in named.items()) / len(named)
            assert m.clip_t(f[None], text) == truth, (a, text)
    assert m.clip_t(feats, "a sks thing") is None  # names nothing the toy world knows
    with pytest.raises(ev.EvalError, match="toy-dino and toy-clip go together"):
        ev.metric_models("toy-dino", "tiny-clip")


@needs_weights
def test_toy_dino_tells_the_subject_from_other_instances():
    """Subject fidelity as eval computes it (mean cosine of toy-dino embeddings). Measured: the subject's
    photos against themselves 0.998 (different scenes, sizes, positions), random toys against them 0.49,
    another class's subject 0.0005."""
    import random

    from dreambooth_ray import eval as ev

    m = ev.metric_models("toy-dino", "toy-clip")
    subject = m.dino_features([im for _, im in tw.subject_photos("toy-purple-dots", 5)])[0]
    toys = m.dino_features([tw.render(tw.random_attrs(random.Random(i), cls="toy")) for i in range(10)])[0]
    dog = m.dino_features([im for _, im in tw.subject_photos("dog-yellow-stripes", 5)])[0]
    assert ev.mean_cosine(subject, subject) >= 0.95
    assert ev.mean_cosine(toys, subject) <= 0.75
    assert ev.mean_cosine(dog, subject) <= 0.1
