"""Rare-token identifiers, as in the DreamBooth paper: `identifier: auto` picks one from the vocabulary.

A good identifier is a single token the model has weak priors for: rare (a rank window of the
vocabulary, whose ids follow frequency: merge order in CLIP's BPE, piece score in T5's sentencepiece,
where the paper found its window), short (at most 3 characters, so its spelling carries little
meaning), not an English word, and not the class noun. Only whole-word tokens qualify: CLIP marks a
word's end ("sks</w>"), sentencepiece its start ("▁sks").
"""

from __future__ import annotations

import functools
import logging
import random

from .spec import IdentifierConfig, Subject

log = logging.getLogger("dreambooth_ray")


@functools.lru_cache(maxsize=1)
def _english() -> frozenset[str]:
    from english_words import get_english_words_set

    return frozenset(get_english_words_set(["web2", "gcide"], lower=True))


def _whole_word(token: str) -> str | None:
    if token.endswith("</w>"):
        return token[: -len("</w>")]
    if token.startswith("\u2581"):
        return token[1:]
    return None


def candidates(tokenizer, class_noun: str = "", cfg: IdentifierConfig = IdentifierConfig()) -> list[tuple[int, str]]:
    """(token id, text) of every acceptable identifier in the configured rank window."""
    vocab = tokenizer.get_vocab()
    lo, hi = cfg.rank_min, cfg.rank_max
    if lo >= len(vocab):  # a small vocabulary (the tiny model): use its rarest half
        log.warning("vocabulary has %d tokens, below rank %d; using ranks %d-%d", len(vocab), lo, len(vocab) // 2, len(vocab))
        lo, hi = len(vocab) // 2, len(vocab)
    words = _english()
    out = []
    for token, tid in vocab.items():
        text = _whole_word(token)
        if not (lo <= tid < hi) or text is None:
            continue  # a word piece would merge with its neighbours
        if not (1 <= len(text) <= cfg.max_chars and text.isascii() and text.isalpha() and text.islower()):
            continue
        if text in words or text == class_noun.lower() or tokenizer.tokenize(text) != [token]:
            continue
        out.append((tid, text))
    return sorted(out)


def pick(tokenizer, class_noun: str, seed: int, cfg: IdentifierConfig = IdentifierConfig()) -> str:
    found = candidates(tokenizer, class_noun, cfg)
    if not found:
        raise ValueError(f"no rare single-token identifier in vocabulary ranks {cfg.rank_min}-{cfg.rank_max}; "
                         "set identifiers.rank_min/rank_max or give the subject an identifier")
    return random.Random(seed).choice(found)[1]  # stable for a given seed


def resolve(subject: Subject, tokenizer, seed: int, cfg: IdentifierConfig) -> Subject:
    """The subject with `identifier: auto` replaced by a picked token."""
    if subject.identifier != "auto":
        return subject
    return subject.model_copy(update={"identifier": pick(tokenizer, subject.class_noun, seed, cfg)})


def cmd_identifiers(args, console) -> int:
    from . import models

    tok = models.load_tokenizer(args.model)
    cfg = IdentifierConfig(rank_min=args.rank_min, rank_max=args.rank_max)
    found = candidates(tok, args.class_noun or "", cfg)
    for tid, text in found[: args.n]:
        print(f"{text}\t(token {tid})")
    console.print(f"{len(found)} candidates; `identifier: auto` with seed {args.seed} picks "
                  f"{pick(tok, args.class_noun or '', args.seed, cfg)!r}", highlight=False)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("identifiers", help="list rare-token identifier candidates for a model")
    p.add_argument("--model", default="tiny")
    p.add_argument("--class", dest="class_noun", default="")
    p.add_argument("--rank-min", type=int, default=IdentifierConfig().rank_min)
    p.add_argument("--rank-max", type=int, default=IdentifierConfig().rank_max)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-n", type=int, default=30)
    p.set_defaults(fn=cmd_identifiers)
