"""The tiny base's pretraining corpus: generated generic prose, none of the sources' formats.

It lives beside the synthetic sources because it is their counterpart: the sources teach the
tasks, this text teaches only what a pretrained LLM brings to them (see :func:`_document`).
"""

from __future__ import annotations

import random

_NOUNS = (
    "river", "house", "garden", "window", "teacher", "market", "letter", "bridge", "forest",
    "doctor", "kitchen", "island", "train", "mountain", "story", "engine", "village", "table",
    "painter", "lamp", "road", "school", "basket", "bird", "ship", "field", "child", "storm",
    "farmer", "clock", "song", "door", "horse", "tower", "cloud", "stone", "friend", "map",
)  # fmt: skip
_ADJECTIVES = (
    "old", "quiet", "bright", "small", "heavy", "green", "cold", "busy", "gentle", "tall",
    "narrow", "warm", "dark", "happy", "empty", "strange", "red", "blue", "soft", "long",
)  # fmt: skip
_VERBS = (
    "found", "carried", "watched", "painted", "opened", "followed", "built", "crossed",
    "visited", "cleaned", "moved", "repaired", "described", "remembered", "sold", "lifted",
)  # fmt: skip
# Bump when pretraining_text changes, so cached bases built from the old text are not reused.
CORPUS_VERSION = 4
_PLACES = ("the north", "the coast", "the old town", "the valley", "the harbor", "the hills")
_CONNECT = ("Later,", "Then", "After that,", "Meanwhile,", "In the morning,", "At night,")


def _name(rng: random.Random) -> str:
    syllables = "".join(rng.choice("bdfghklmnprstvwz") + rng.choice("aeiou") for _ in range(2))
    return (syllables + rng.choice(("", "n", "l", "ck", "th"))).capitalize()


def _plural(noun: str) -> str:
    return (
        noun[:-1] + "ies" if noun.endswith("y") else noun + ("es" if noun.endswith("ch") else "s")
    )


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))


def _document(rng: random.Random) -> str:
    """A few sentences of generic prose about a few recurring names, words and numbers.

    Like real text, a document repeats its names, words and numbers, so pretraining teaches
    the model to look back and copy from its context (induction heads); and like real text it
    talks about letters, case and numbers -- spelling, capitals, counts, sums in words. These
    are the general skills a pretrained LLM brings to instruction tuning. None of the sources'
    formats appear (no ``+``/``=``, no questions, no ``[op]`` instructions, no prompt
    separator), and none of the fact table, so the base is weak on every source.
    """
    who, other = _name(rng), _name(rng)
    word = _letters(rng)
    # Random letter strings cannot be memorised, only copied: they make the model learn to
    # look back at its context, the skill every source builds on.
    listed = " ".join(_letters(rng) for _ in range(rng.randint(2, 4)))
    code = "".join(
        rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(rng.randint(3, 6))
    )
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    hi, lo = max(a, b), min(a, b)
    noun, noun2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
    sentences = [
        f"{who} {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} {noun} near {rng.choice(_PLACES)}.",
        f"{who} had {a} {_plural(noun)} and {other} had {b}, so together they had {a + b}.",
        f"Of {hi} {_plural(noun2)}, {other} gave away {lo}, which left {hi - lo}.",
        f"The {noun} was called {word}, and {other} wrote {word.upper()} on the {noun2}.",
        f"The word {word} has {len(word)} letters: {' '.join(word)}.",
        f"Backwards, {word} reads {word[::-1]}; in order, its letters are {''.join(sorted(word))}.",
        f"{who.upper()} and {other} {rng.choice(_VERBS)} {a} {_plural(noun2)} in {rng.randint(1200, 2030)}.",
        f"Page {rng.randint(1, 400)} says {who} {rng.choice(_VERBS)} {word} by the {noun}.",
        f"{who} said {listed}, and {other} said {listed} too.",
        f"The sign read {code}; {other} copied it as {code} and read it aloud: {code}.",
        " ".join(
            rng.choice(_NOUNS + _ADJECTIVES + _VERBS) for _ in range(rng.randint(3, 7))
        ).capitalize()
        + ".",
    ]
    rng.shuffle(sentences)
    prose = " ".join(sentences[: rng.randint(4, 7)])
    # A dense run of repeated random words closes each document: copying from context is the
    # skill word_edit needs. Measured (hidden 128, 4 layers, 600 steps at lr 1e-3), a base
    # from this text fine-tuned on word_edit (1000 steps, lr 1e-3) reached 85% test accuracy;
    # the base from prose alone (lr 3e-3, 300 steps) gave 26% (count only, no copying).
    # Neither base yet predicts a repeated random string better than its first occurrence:
    # the copying itself is learnt during fine-tuning.
    pairs, length = [], 0
    while length < 200:
        w = _letters(rng)
        pairs.append(rng.choice((f"{w} {w}", f"{w}, {w}", f"{w} and {w}", f"{w} or {w.upper()}")))
        length += len(pairs[-1])
    return prose + " Again: " + ", ".join(pairs) + "."


def pretraining_text(n_chars: int, seed: int) -> list[str]:
    """Generated documents (see :func:`_document`) totalling about ``n_chars`` characters.

    They share the tiny tokenizer's characters with every source but none of its formats, so
    the base knows the alphabet yet is weak on every task.
    """
    rng = random.Random(f"dem-pretrain-text/{seed}")
    docs, total = [], 0
    while total < n_chars:
        docs.append(_document(rng))
        total += len(docs[-1]) + 2
    return docs
