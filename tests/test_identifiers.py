"""`identifier: auto`: a rare single token, short, not a word, not the class, stable for a seed."""

import pytest
from transformers import CLIPTokenizer

from dreambooth_ray import identifiers, tiny
from dreambooth_ray.spec import IdentifierConfig, SpecError, parse_spec


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tiny.write_tokenizer(path)
    return CLIPTokenizer.from_pretrained(path)


def test_candidates_are_rare_short_non_words(tok):
    found = [text for _, text in identifiers.candidates(tok, "toy")]
    # The tiny vocabulary's whole-word tokens include real words (dog, hat, red, ...) and three
    # non-words; only the non-words qualify.
    assert sorted(found) == ["qlt", "sks", "zwx"]
    for text in found:
        assert len(tok.tokenize(text)) == 1 and len(text) <= 3


def test_class_noun_and_rank_window_are_respected(tok):
    assert "sks" not in [t for _, t in identifiers.candidates(tok, "sks")]
    vocab = tok.get_vocab()
    sks = vocab["sks</w>"]
    only_sks = IdentifierConfig(rank_min=sks, rank_max=sks + 1)
    assert identifiers.candidates(tok, "toy", only_sks) == [(sks, "sks")]
    with pytest.raises(ValueError, match="no rare single-token identifier"):
        identifiers.pick(tok, "toy", 0, IdentifierConfig(rank_min=0, rank_max=256))


def test_pick_is_stable_for_a_seed_and_varies_across_seeds(tok):
    picks = {seed: identifiers.pick(tok, "dog", seed) for seed in range(12)}
    assert all(identifiers.pick(tok, "dog", s) == p for s, p in picks.items())
    assert len(set(picks.values())) > 1


def test_auto_resolves_into_the_prompts(tok):
    spec = parse_spec({"name": "j", "subject": {"name": "a", "images": "x", "class": "dog", "identifier": "auto"}})
    subject = identifiers.resolve(spec.subjects[0], tok, 3, spec.identifiers)
    assert subject.identifier in {"sks", "zwx", "qlt"}
    assert subject.instance_text == f"a {subject.identifier} dog"
    with pytest.raises(SpecError, match="identifiers: rank_max must be above rank_min"):
        parse_spec({"name": "j", "subject": {"name": "a", "images": "x", "class": "dog"},
                    "identifiers": {"rank_min": 10, "rank_max": 5}})


def test_cli_lists_candidates(capsys):
    from dreambooth_ray.cli import main

    assert main(["identifiers", "--model", "tiny", "--class", "dog"]) == 0
    out = capsys.readouterr()
    assert "sks\t(token" in out.out and "picks" in out.err
