"""When do distribution vectors merge? Sizes and loss along straight lines in weight space.

Three measurements, all on validation data, all from the base and the vectors in memory:

- :func:`relative_norms`: ``‖vᵢ‖ / ‖θ0‖``. Instruction tuning of a pretrained LLM moves its
  weights by well under a few percent; a from-scratch fine-tune moves them by a quarter.
- :func:`straight_path`: the loss at ``θ0 + t·vᵢ`` for ``t`` in [0, 1] (and beyond), per
  source: does the loss fall smoothly on the way to θᵢ, and what does θᵢ do to the *other*
  sources?
- :func:`between_fine_tunes`: the loss at ``θ0 + (1-s)·vᵢ + s·vⱼ``, the straight line from θᵢ to
  θⱼ (linear mode connectivity, Frankle et al. 2020). Its *barrier* -- how far the loss rises
  above the straight line between the endpoints' losses -- says whether θᵢ and θⱼ sit in one
  basin. A weighted sum of the vectors only keeps both skills when there is no barrier.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from dem.search.weights import InMemoryMerge, validation_scorer

Vector = Mapping[str, torch.Tensor]


def relative_norms(base: Mapping[str, torch.Tensor], vectors: Mapping[str, Vector]) -> pd.DataFrame:
    """``‖vᵢ‖``, ``‖θ0‖`` and their ratio per source (over the tensors the vectors cover)."""

    def norm(tensors) -> float:
        return float(sum(t.double().pow(2).sum() for t in tensors)) ** 0.5

    rows = []
    for source, vector in vectors.items():
        names = [n for n, t in vector.items() if t.is_floating_point()]
        v, b = norm(vector[n] for n in names), norm(base[n] for n in names)
        rows.append({"source": source, "vector_norm": v, "base_norm": b, "relative": v / b})
    return pd.DataFrame(rows)


def _losses(score, w: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("loss/"): v for k, v in score(w).items() if k.startswith("loss/")}


def straight_path(
    merger: InMemoryMerge, tokenizer, sources: Sequence, ts: Sequence[float], **evaluation
) -> pd.DataFrame:
    """Validation loss of every source at ``θ0 + t·vᵢ`` (tidy: vector, t, source, loss)."""
    score = validation_scorer(merger, tokenizer, sources, metric="loss", **evaluation)
    rows = []
    for name in merger.sources:
        for t in ts:
            losses = _losses(score, {s: float(t) * (s == name) for s in merger.sources})
            rows += [
                {"vector": name, "t": float(t), "source": s, "loss": v} for s, v in losses.items()
            ]
    return pd.DataFrame(rows)


def between_fine_tunes(
    merger: InMemoryMerge, tokenizer, sources: Sequence, ss: Sequence[float], **evaluation
) -> pd.DataFrame:
    """Loss on the path θᵢ → θⱼ for every pair (tidy: pair, s, loss = mean over i's and j's).

    The loss averages the two sources' validation losses: at either end one model is an expert
    and the other source is foreign to it, so the endpoints are comparable.
    """
    by_name = {s.name: s for s in sources}
    rows = []
    for a, b in itertools.combinations(merger.sources, 2):
        score = validation_scorer(
            merger, tokenizer, [by_name[a], by_name[b]], metric="loss", **evaluation
        )
        for s in ss:
            w = {n: 0.0 for n in merger.sources} | {a: 1.0 - float(s), b: float(s)}
            rows.append({"pair": f"{a} → {b}", "s": float(s), "loss": score(w)["objective"]})
    return pd.DataFrame(rows)


def merge_gaps(straight: pd.DataFrame, between: pd.DataFrame) -> pd.DataFrame:
    """Per pair: how much worse the best point between θᵢ and θⱼ is than the two experts.

    ``expert`` is the mean of each source's validation loss under its own fine-tune (θᵢ on i,
    θⱼ on j: what the two models together would give); ``best_mix`` the lowest mean loss on
    the path θ0 + (1-s)·vᵢ + s·vⱼ; ``gap`` the difference. A gap near 0 means one model on the
    path keeps both skills -- what DEM needs; a large gap means every mix loses most of them.
    (The classic barrier, :func:`barriers`, can be 0 while the gap is large: when each end is
    bad on the other's source, the line between the ends is already far above the experts.)
    """
    own = straight[(straight.t == 1.0) & (straight.vector == straight.source)]
    own = own.set_index("source")["loss"]
    rows = []
    for pair, group in between.groupby("pair", sort=False):
        i, j = pair.split(" → ")
        expert = (own[i] + own[j]) / 2
        best = float(group.loss.min())
        rows.append({"pair": pair, "expert": expert, "best_mix": best, "gap": best - expert})
    return pd.DataFrame(rows)


def barriers(path: pd.DataFrame) -> pd.DataFrame:
    """Per pair: the endpoints' losses and the largest rise above the line joining them."""
    rows = []
    for pair, group in path.groupby("pair", sort=False):
        group = group.sort_values("s")
        s, loss = group.s.to_numpy(), group.loss.to_numpy()
        line = loss[0] + (loss[-1] - loss[0]) * (s - s[0]) / (s[-1] - s[0])
        rows.append(
            {
                "pair": pair,
                "loss_i": loss[0],
                "loss_j": loss[-1],
                "barrier": float(np.max(loss - line)),
            }
        )
    return pd.DataFrame(rows)
