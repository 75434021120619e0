"""The core types: an :class:`Example`, a :class:`Source`, and the splits every source shares.

Splits never share a prompt: every example is assigned to a split by a hash of its prompt
(independent of the seed), so the same prompt lands in the same split for every seed and size.
A source builds the examples of a split in one of two ways, both defined here: drawing from a
generator until enough distinct prompts belong to the split (:func:`generated`), or filtering
and shuffling a finite pool (:func:`pooled`).
"""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from dem import DemError
from dem.sources.extract import EXTRACTORS

SPLITS = ("train", "validation", "test")
# Share of the prompt space (hash buckets) owned by each split.
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
# Sizes for the tiny default: enough for a few hundred CPU steps at batch 32 and a
# validation/test set whose accuracy resolves ~3 points, yet fast to evaluate.
DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200}


@dataclass(frozen=True)
class Example:
    """One (prompt, response) pair; ``answer`` is what the metric compares to."""

    prompt: str  # the instruction/question shown to the model (no template applied)
    response: str  # the target text trained on (e.g. worked steps ending in the answer)
    answer: str  # gold answer the metric compares to (normalised)
    choices: tuple[str, ...] = ()  # multiple choice: candidate responses, scored by log-likelihood


# --- the Source ------------------------------------------------------------------------------
def split_of(prompt: str, fractions: dict[str, float] | None = None) -> str:
    """The split a prompt belongs to: a stable hash, so splits never share a prompt."""
    fractions = fractions or SPLIT_FRACTIONS
    bucket = int.from_bytes(hashlib.sha1(prompt.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < fractions["train"]:
        return "train"
    if bucket < fractions["train"] + fractions["validation"]:
        return "validation"
    return "test"


@dataclass
class Source:
    """A named data source with deterministic splits and a metric.

    Subclasses (or a ``make_examples`` callable) provide the examples of a split; results are
    cached, so repeated ``examples(split)`` calls (the weight search) cost nothing.
    """

    name: str
    description: str
    metric: str = "exact_match"  # "exact_match" (generated answer) | "choice" (log-likelihood)
    max_new_tokens: int = 16  # generation budget for accuracy
    extractor: str = "text"  # key of EXTRACTORS
    eval_only: bool = False  # composite: never trained on, no train split
    sizes: dict[str, int | None] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    seed: int = 0
    make_examples: Callable[[Source, str], list[Example]] | None = field(default=None, repr=False)
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False, compare=False)

    def with_max_new_tokens(self, max_new_tokens: int) -> Source:
        """A copy of this source with another generation budget; this one is left unchanged.

        The copy shares the examples already made (they do not depend on the budget).
        """
        if max_new_tokens < 1:
            raise DemError(
                f"source {self.name!r}: max_new_tokens must be a positive number of tokens, "
                f"got {max_new_tokens}"
            )
        return replace(self, max_new_tokens=max_new_tokens, _cache=dict(self._cache))

    def examples(self, split: str) -> list[Example]:
        """The examples of ``split`` ("train", "validation" or "test"), deterministic."""
        if split not in SPLITS:
            raise DemError(
                f"source {self.name!r}: unknown split {split!r}; expected one of {SPLITS}"
            )
        if self.eval_only and split == "train":
            raise DemError(
                f"source {self.name!r} is evaluation-only (it measures skill combination and is "
                "never trained on); use split 'validation' or 'test'"
            )
        if split not in self._cache:
            examples = self._make(split)
            if not examples:
                raise DemError(
                    f"source {self.name!r}: split {split!r} is empty "
                    f"(requested {self.sizes.get(split)!r} examples)"
                )
            self._cache[split] = examples
        return self._cache[split]

    def _make(self, split: str) -> list[Example]:
        if self.make_examples is None:
            raise NotImplementedError(f"source {self.name!r} defines no examples")
        return self.make_examples(self, split)

    def extract_answer(self, generated: str) -> str:
        """From generated response text to the answer the metric compares with ``answer``."""
        return EXTRACTORS[self.extractor](generated)

    def score(self, generated: str, example: Example) -> float:
        """1.0 when the extracted answer equals the gold answer, else 0.0."""
        return float(self.extract_answer(generated) == example.answer)


# --- helpers for generated sources ----------------------------------------------------------
def _rng(seed: int, name: str, split: str) -> random.Random:
    # random.Random with a string seed is stable across runs and platforms (it hashes with
    # sha512), unlike hash(), which is salted per process.
    return random.Random(f"{name}/{split}/{seed}")


def _sample_unique(
    draw: Callable[[random.Random], Example], rng: random.Random, split: str, n: int, name: str
) -> list[Example]:
    """Draw examples until ``n`` distinct prompts belong to ``split`` (hash assignment).

    When the split's prompt space runs out, the training split cycles through what it has
    (more epochs over the same prompts); evaluation splits warn and return fewer.
    """
    seen: set[str] = set()
    out: list[Example] = []
    misses = 0
    # A miss is a duplicate or a prompt owned by another split. Even the 10% splits miss only
    # ~90% of draws, so thousands of misses in a row mean the prompt space is exhausted.
    while len(out) < n and misses < 5000:
        ex = draw(rng)
        if ex.prompt in seen or split_of(ex.prompt) != split:
            misses += 1
            continue
        misses = 0
        seen.add(ex.prompt)
        out.append(ex)
    if len(out) < n and split == "train" and out:
        return [out[i % len(out)] for i in range(n)]
    if len(out) < n:
        warnings.warn(
            f"source {name!r}: only {len(out)} distinct {split} prompts exist; asked for {n}",
            stacklevel=3,
        )
    return out


def _pool_split(
    examples: Iterable[Example],
    split: str,
    n: int | None,
    seed: int,
    name: str,
    repeat: bool,
    fractions: dict[str, float] | None = None,
) -> list[Example]:
    """The examples of a finite pool that belong to ``split``, shuffled by seed, first ``n``.

    ``repeat``: the training split may cycle through its pool when more examples are asked
    for than exist (more epochs over the same prompts); evaluation splits never repeat.
    """
    pool: dict[str, Example] = {}
    for ex in examples:
        if split_of(ex.prompt, fractions) == split:
            pool.setdefault(ex.prompt, ex)  # dedupe by prompt; first occurrence wins
    items = sorted(pool.values(), key=lambda e: e.prompt)  # independent of file order
    _rng(seed, name, split).shuffle(items)
    if n is None or n <= len(items):
        return items[:n] if n is not None else items
    if repeat and split == "train" and items:
        return [items[i % len(items)] for i in range(n)]
    warnings.warn(
        f"source {name!r}: split {split!r} has {len(items)} distinct examples; asked for {n}",
        SmallSplitWarning,
        stacklevel=3,
    )
    return items


class SmallSplitWarning(UserWarning):
    """A finite pool holds fewer distinct examples for a split than were asked for."""


# --- making a split: from a generator or from a finite pool ----------------------------------
def generated(draw: Callable[[random.Random], Example]) -> Callable[[Source, str], list[Example]]:
    """A ``make_examples`` drawing from ``draw`` until the split has enough distinct prompts."""

    def make(source: Source, split: str) -> list[Example]:
        n = source.sizes.get(split) or DEFAULT_SIZES[split]
        return _sample_unique(draw, _rng(source.seed, source.name, split), split, n, source.name)

    return make


def pooled(
    pool: Callable[[], Iterable[Example]],
    repeat_train: bool = True,
    fractions: dict[str, float] | None = None,
) -> Callable[[Source, str], list[Example]]:
    """A ``make_examples`` splitting the finite ``pool`` (see :func:`_pool_split`)."""

    def make(source: Source, split: str) -> list[Example]:
        n = source.sizes.get(split)
        return _pool_split(pool(), split, n, source.seed, source.name, repeat_train, fractions)

    return make
