"""Associative recall on the world's words: stage 0's warm-up, before the LLM can read (docs/reading.md).

A small LLM forms the look-up head that reading needs (find the key, copy what follows it) on key–value pairs asked
again, far sooner than on reading data, where the answer is many tokens away from the noun asked about; then the
same recall with words in between, and asked in the benchmarks' closed formats.
"""
from __future__ import annotations

import random

from monovl.world.data import LETTERS, YESNO, Fact, describe, mc_prompt
from monovl.world.images import sample_scene

RECALL_GAPS = ("", " is", " colour is the", "? Answer:")  # between a repeated key and its value


def recall_vocabulary(facts: list[Fact], rng: random.Random) -> tuple[list[str], list[str]]:
    """(keys, values): the world's words (facts and scene descriptions), shuffled and split in two disjoint halves."""
    texts = [t for f in facts for t in (*f.statements, f.question, f.answer)]
    texts += [describe(sample_scene(rng)) for _ in range(200)]
    words = sorted({w for t in texts for w in (part.strip('.,?"()') for part in t.split()) if w.isalpha()})
    rng.shuffle(words)
    return words[: len(words) // 2], words[len(words) // 2:]


def _listed(keys: list[str], values: list[str]) -> dict:
    """A drill's context segment: the key–value pairs in a row (" k1 v1 k2 v2 …."), without loss."""
    return {"text": "".join(f" {a} {b}" for a, b in zip(keys, values)) + ".", "loss": False}


def recall_drill(keys: list[str], values: list[str], rng: random.Random, *, gaps=("",), pairs: int = 8) -> dict:
    """Associative recall, stage 0's warm-up: `pairs` key–value word pairs, then every key again in another order,
    each followed (after one of `gaps`) by its value; the loss on the values only (a `segments` text). On this a
    small LLM forms the look-up head (find the key, copy what follows it) that reading is built on; with the
    value right after the key it forms first, and the gapped forms follow (docs/reading.md)."""
    k, gap = rng.sample(keys, pairs), rng.choice(gaps)
    v = [rng.choice(values) for _ in k]
    segments = [_listed(k, v)]
    for j in rng.sample(range(pairs), pairs):
        segments += [{"text": f" {k[j]}{gap}", "loss": False}, {"text": f" {v[j]}"}]
    return {"segments": segments}


def recall_choice(keys: list[str], values: list[str], rng: random.Random, *, pairs: int = 8,
                  queries: int = 6) -> dict:
    """Recall answered in the benchmarks' closed formats: `pairs` key–value pairs, then keys asked as multiple
    choice (four of the pairs' values as options; the answer is the letter of the key's value) or as yes/no (is
    this the key's value?), the loss on the answers only. Open recall alone leaves both at chance: here the
    looked-up value must also be compared with the options or the candidate."""
    k = rng.sample(keys, pairs)
    v = rng.sample(values, pairs)
    segments = [_listed(k, v)]
    for j in rng.sample(range(pairs), queries):
        if rng.random() < 0.5:
            options = rng.sample([x for x in v if x != v[j]], 3) + [v[j]]
            rng.shuffle(options)
            segments += [{"text": "\n" + mc_prompt(f"{k[j]}?", options), "loss": False},
                         {"text": f" {LETTERS[options.index(v[j])]}"}]
        else:
            yes = rng.random() < 0.5
            candidate = v[j] if yes else rng.choice([x for x in v if x != v[j]])
            segments += [{"text": f"\n{k[j]} {candidate}?{YESNO}", "loss": False},
                         {"text": " Yes" if yes else " No"}]
    return {"segments": segments}
