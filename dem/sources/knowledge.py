"""The faithful regime's pretraining corpus: what the sources need, never how they ask for it.

A pretrained LLM comes to instruction tuning already knowing facts, arithmetic and spelling from
raw text, and already used to answering requests (the web is full of them). Instruction tuning
then teaches a *format*, moving the weights only a little. This corpus gives the tiny base the
same start. Its documents are:

* generic prose (:func:`dem.sources.pretraining._document`), 20%;
* the sources' knowledge in raw form, 30%: lists of sums, sentences about the fictional people
  of ``data/facts.csv``, word transformations described in prose;
* requests in a neutral ``request\\n=> answer`` layout, 50%: the sources' skills asked in other
  words (``add 37 and 5``, ``backwards: abc``, ``home town of Tazal``, ``start at 28, add 5,
  then take away 6``) and tasks no source has (copy, first letter, next number, ...).

No source's prompt wording, no ``####`` answer line, and no validation or test item of a
built-in source at its default size appears (sums, word problems and words are excluded by
content), so each fine-tune must still learn its source's format, and test scores measure
generalisation, not recall. The facts themselves are the knowledge the base is meant to have.
"""

from __future__ import annotations

import functools
import itertools
import random
import re

from dem.sources.pretraining import _document, _letters

# Bump when the text changes, so cached bases built from the old text are not reused.
CORPUS_VERSION = 1


# The seeds whose validation and test items are kept out: the documented three-seed runs use
# 0, 1 and 2; a run with a larger seed may meet a few of its test items here.
HELD_OUT_SEEDS = range(5)


@functools.lru_cache(maxsize=1)
def _held_out() -> dict[str, frozenset]:
    """Content of the built-in sources' validation and test examples (default sizes)."""
    from dem.sources import get_source  # the registry imports this package's modules

    sums, problems, words = set(), set(), set()
    for seed, split in itertools.product(HELD_OUT_SEEDS, ("validation", "test")):
        for ex in get_source("arithmetic", seed=seed).examples(split):
            sums.add(frozenset(int(x) for x in ex.prompt[:-1].split("+")))
        for ex in get_source("arithmetic_cot", seed=seed).examples(split):
            problems.add(tuple(int(x) for x in re.findall(r"\d+", ex.prompt)))
        for ex in get_source("word_edit", seed=seed).examples(split):
            words.add(ex.prompt.split("] ", 1)[1])
    return {"sums": frozenset(sums), "problems": frozenset(problems), "words": frozenset(words)}


@functools.lru_cache(maxsize=1)
def _facts() -> tuple[dict[str, str], ...]:
    from dem.sources.synthetic import load_fact_table

    return tuple(load_fact_table())


def _sum(rng: random.Random) -> tuple[int, int]:
    while True:
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        if frozenset((a, b)) not in _held_out()["sums"]:
            return a, b


def _word(rng: random.Random) -> str:
    while True:
        word = _letters(rng)[:5]
        if word not in _held_out()["words"]:
            return word


def _sums(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(6, 12)):
        a, b = _sum(rng)
        parts.append(f"{a}+{b}={a + b}" if rng.random() < 0.5 else f"{b}+{a}={a + b}")
    return "Sums: " + ", ".join(parts) + "."


def _fact_sentences(rng: random.Random) -> str:
    sentences = []
    for row in rng.sample(_facts(), rng.randint(2, 4)):
        e = row["entity"]
        bits = [f"{e} lives in {row['city']}.", f"{e} is {row['age']} years old.",
                f"The favorite color of {e} is {row['color']}."]  # fmt: skip
        rng.shuffle(bits)
        sentences += bits
    return " ".join(sentences)


def _word_prose(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        w = _word(rng)
        sentences.append(rng.choice((
            f"Backwards, {w} reads {w[::-1]}.",
            f"In capitals, {w} is {w.upper()}.",
            f"Sorted, the letters of {w} are {''.join(sorted(w))}.",
            f"The word {w} has {len(w)} letters.",
        )))  # fmt: skip
    return " ".join(sentences)


def _request(rng: random.Random) -> str:
    """One request in the neutral layout: a source's skill in other words, or another task."""
    kind = rng.randrange(8)
    if kind == 0:
        a, b = _sum(rng)
        return f"add {a} and {b}\n=> {a + b}"
    if kind == 1:
        while True:
            a, b, c = rng.randint(10, 60), rng.randint(2, 9), rng.randint(1, 9)
            held = _held_out()
            # its first step is a sum: keep arithmetic's held-out sums out of it too
            if (a, b, c) not in held["problems"] and frozenset((a, b)) not in held["sums"]:
                break
        steps = f"{a}+{b}={a + b}, {a + b}-{c}={a + b - c}, so {a + b - c}"
        return f"start at {a}, add {b}, then take away {c}\n=> {steps}"
    if kind in (2, 3):
        w = _word(rng)
        request, answer = rng.choice((
            (f"backwards: {w}", w[::-1]),
            (f"capitals: {w}", w.upper()),
            (f"letters in order: {w}", "".join(sorted(w))),
            (f"length of {w}", str(len(w))),
        ))  # fmt: skip
        return f"{request}\n=> {answer}"
    if kind in (4, 5):
        row = rng.choice(_facts())
        attribute = rng.choice(("color", "city", "age"))
        request = {"color": "favorite color of", "city": "home town of", "age": "years of"}
        return f"{request[attribute]} {row['entity']}\n=> {row[attribute]}"
    w, n = _word(rng), rng.randint(10, 98)
    request, answer = rng.choice((
        (f"copy: {w}", w), (f"first letter: {w}", w[0]), (f"last letter: {w}", w[-1]),
        (f"next number: {n}", str(n + 1)), (f"previous number: {n}", str(n - 1)),
        (f"twice: {w}", f"{w} {w}"), (f"first two letters: {w}", w[:2]),
    ))  # fmt: skip
    return f"{request}\n=> {answer}"


def _knowledge_document(rng: random.Random) -> str:
    k = rng.random()
    if k < 0.20:
        return _document(rng)
    if k < 0.30:
        return _sums(rng)
    if k < 0.40:
        return _fact_sentences(rng)
    if k < 0.50:
        return _word_prose(rng)
    return "\n\n".join(_request(rng) for _ in range(rng.randint(2, 5)))


def pretraining_text(n_chars: int, seed: int) -> list[str]:
    """Generated documents (see the module docstring) totalling about ``n_chars`` characters."""
    rng = random.Random(f"dem-knowledge-text/{seed}")
    docs, total = [], 0
    while total < n_chars:
        docs.append(_knowledge_document(rng))
        total += len(docs[-1]) + 2
    return docs
