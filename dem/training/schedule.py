"""The data order: mixture ratios, the DMix sampler and the run's schedule of micro-batches.

Reproducibility and resumption rest on one rule: **the data order is a pure function of the
run's parameters** (seed, mixture, sizes, steps, batch). The whole schedule -- which examples
form each micro-batch of each step -- is computed up front from them, so a resumed run simply
recomputes it and continues at the checkpointed step.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from dem import DemError


def parse_mixture(text: str) -> dict[str, float]:
    """``"a=0.5,b=0.3"`` -> ``{"a": 0.5, "b": 0.3}`` (for the command line)."""
    mixture: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise DemError(f"mixture entry {part!r} is not NAME=RATIO (e.g. arithmetic=0.5)")
        try:
            mixture[name.strip()] = float(value)
        except ValueError:
            raise DemError(
                f"mixture ratio for {name.strip()!r} is not a number: {value!r}"
            ) from None
    if not mixture:
        raise DemError(f"mixture {text!r} names no source; expected NAME=RATIO,NAME=RATIO")
    return mixture


def normalize_mixture(mixture: Mapping[str, float]) -> dict[str, float]:
    """Check the ratios (finite, non-negative, not all zero) and scale them to sum to 1.

    Sources with ratio 0 are dropped: they contribute nothing and need not be loaded.
    """
    if not mixture:
        raise DemError("mixture is empty; give at least one source, e.g. {'arithmetic': 1.0}")
    for name, ratio in mixture.items():
        if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
            raise DemError(f"mixture ratio of {name!r} must be a finite number >= 0, got {ratio!r}")
    total = float(sum(mixture.values()))
    if total <= 0:
        raise DemError(f"mixture ratios are all zero ({dict(mixture)}); at least one must be > 0")
    return {name: ratio / total for name, ratio in mixture.items() if ratio > 0}


def sample_sources(mixture: Mapping[str, float], n: int, seed: int) -> list[str]:
    """The DMix sampler: the source of each of ``n`` example slots, in the mixture's ratios.

    Counts are exact, not drawn: each source gets ``n * ratio`` slots rounded by largest
    remainder, then the slots are shuffled. So a uniform mixture of K sources trained for the
    steps of K equal fine-tunes sees, source by source, exactly the examples (and tokens) the
    fine-tunes saw -- the equal budget DEM is compared at -- and no comparison rests on the luck
    of a draw. ``random.Random`` with a string seed is stable across platforms and versions.
    """
    ratios = normalize_mixture(mixture)
    names = sorted(ratios)  # fixed order: the result must not depend on dict order
    exact = {k: n * ratios[k] for k in names}
    counts = {k: int(exact[k]) for k in names}
    by_remainder = sorted(names, key=lambda k: (-(exact[k] - counts[k]), k))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    slots = [k for k in names for _ in range(counts[k])]
    random.Random(f"dem-mixture/{seed}").shuffle(slots)
    return slots


def _epoch_order(n: int, seed: int, name: str, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"dem-epoch/{seed}/{name}/{epoch}").shuffle(order)
    return order


def build_schedule(
    lengths: Mapping[str, Sequence[int]],
    mixture: Mapping[str, float],
    *,
    n_batches: int,
    batch_size: int,
    seed: int,
    pool_batches: int = 64,
) -> list[list[tuple[str, int]]]:
    """Which examples (source, index) form each of ``n_batches`` micro-batches, in order.

    Each slot's source is drawn by the mixture ratios; within a source, examples are taken in
    a fresh random order per epoch (every example once before any repeats). Slots are then
    length-bucketed like :func:`dem.sources.data.make_batches` -- pools of ``pool_batches`` batches
    sorted by length -- so batches need little padding, and the batch order is shuffled.
    Each batch lists its examples shortest first. Pure function of its arguments: this is
    what makes resumption exact.
    """
    slots = sample_sources(mixture, n_batches * batch_size, seed)
    taken = dict.fromkeys(lengths, 0)
    orders: dict[tuple[str, int], list[int]] = {}
    picks: list[tuple[str, int]] = []
    for name in slots:
        n = len(lengths[name])
        epoch, pos = divmod(taken[name], n)
        if (name, epoch) not in orders:
            orders[(name, epoch)] = _epoch_order(n, seed, name, epoch)
        picks.append((name, orders[(name, epoch)][pos]))
        taken[name] += 1
    rng = random.Random(f"dem-batches/{seed}")
    pool = batch_size * pool_batches
    batches: list[list[tuple[str, int]]] = []
    for start in range(0, len(picks), pool):
        chunk = sorted(picks[start : start + pool], key=lambda p: lengths[p[0]][p[1]])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
