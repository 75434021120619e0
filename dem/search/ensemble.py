"""The output-space baseline: an ensemble of the per-source fine-tunes (MDE).

Belenki et al. (2025, "Mixtures of Data Experts") approximate a model trained on a data mixture
by mixing the per-source experts' *outputs*: the next-token distribution is
``p(x) = Σ_i w_i · p_i(x)`` with ``Σ_i w_i = 1``. DEM mixes the experts' *weights* instead and
runs one model; the ensemble runs K. Comparing the two says how much of the ensemble a single
merged model keeps, and at what inference cost.

:class:`Ensemble` wraps the K models as one: its ``forward`` returns ``log p`` as the logits, so
:func:`dem.evaluation.evaluate.evaluate` scores it like any model — the response loss is the mixture's
cross-entropy, greedy generation takes the mixture's most likely token, multiple choice sums the
mixture's log-likelihoods. No library offers this for causal LMs with KV caches, hence this
small class.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from dem import DemError
from dem.evaluation.evaluate import evaluate
from dem.models import load_model
from dem.search.weights import MINIMIZE, search_weights, validation_objective


class Ensemble(torch.nn.Module):
    """``log Σ_i w_i · softmax(logits_i)`` of K causal LMs sharing one tokenizer.

    Weights are normalised to sum to 1; members with weight 0 are not run at all, so a one-hot
    ensemble costs exactly its one member. Each member keeps its own KV cache during generation
    (``cache`` is a list, one per member run).
    """

    def __init__(self, members: Sequence[Any], weights: Sequence[float]):
        super().__init__()
        if len(members) != len(weights):
            raise DemError(f"ensemble: {len(members)} models but {len(weights)} weights")
        bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
        if bad or sum(weights) <= 0:
            raise DemError(f"ensemble weights must be non-negative with a positive sum, got "
                           f"{list(weights)}")  # fmt: skip
        total = float(sum(weights))
        used = [(m, w / total) for m, w in zip(members, weights, strict=True) if w > 0]
        self.members = torch.nn.ModuleList([m for m, _ in used])
        self.log_weights = [math.log(w) for _, w in used]
        self.config = members[0].config  # max_position_embeddings etc., for the evaluator

    @property
    def forward_passes(self) -> int:
        """Forward passes per token: the ensemble's inference cost in units of one model."""
        return len(self.members)

    def static_cache(self, length: int) -> list:
        from dem.evaluation.evaluate import _static_cache

        return [_static_cache(m, length) for m in self.members]

    def forward(self, input_ids, attention_mask=None, cache=None, **kwargs):
        from dem.evaluation.evaluate import cache_keyword

        caches = cache if cache is not None else [None] * len(self.members)
        logp, new_caches = None, []
        for member, log_w, own in zip(self.members, self.log_weights, caches, strict=True):
            name = cache_keyword(member)
            out = member(input_ids=input_ids, attention_mask=attention_mask, **{name: own},
                         **kwargs)  # fmt: skip
            # log-probabilities in float32 whatever the members' dtype: a sum of probabilities
            # in bf16 would round away the small ones
            term = out.logits.float().log_softmax(-1) + log_w
            logp = term if logp is None else torch.logaddexp(logp, term)
            new_caches.append(getattr(out, name, None))
        return SimpleNamespace(logits=logp, cache=new_caches)


def load_members(paths: Sequence[Path], device) -> list:
    """The per-source fine-tuned models, in evaluation mode, for :class:`dem.search.ensemble.Ensemble`."""
    members = []
    for path in paths:
        model, _ = load_model(str(path), device=device)
        members.append(model.eval())
    return members


def ensemble_search(
    members: Sequence,
    tokenizer,
    sources: Sequence,
    *,
    values: Sequence[float],
    metric: str = "loss",
    max_examples: int | None = None,
    batch_size: int = 64,
    rounds: int = 1,
) -> pd.DataFrame:
    """The output ensemble's (MDE's) weights on validation, by the search metric of every method.

    Coordinate ascent over ``values`` from the uniform mixture (the grid would cost K forward
    passes per token for each of its candidates); the individuals are candidates too. Weights
    are normalised inside the ensemble, so only their ratios matter; all-zero is skipped.
    """
    names = [s.name for s in sources]

    def score(w: Mapping[str, float]) -> dict:
        if not any(w.values()):
            return {"objective": float("inf") if MINIMIZE[metric] else float("-inf")}
        ensemble = Ensemble(members, [w[n] for n in names])
        start = time.perf_counter()
        result = validation_objective(ensemble, tokenizer, sources, metric=metric,
                                      max_examples=max_examples, batch_size=batch_size)  # fmt: skip
        return {**result, "merge_s": 0.0, "eval_s": time.perf_counter() - start,
                "forward_passes": ensemble.forward_passes}  # fmt: skip

    return search_weights(score, names, "coordinate", values=values, rounds=rounds,
                          start=max(values), minimize=MINIMIZE[metric])  # fmt: skip


def evaluate_ensemble(
    members: Sequence,
    tokenizer,
    weights: Mapping[str, float],
    sources: Sequence,
    names: Sequence[str],
    split: str = "test",
    *,
    label: str = "mde",
    max_examples: int | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """The ensemble with ``weights`` (in the order of ``names``) evaluated like a merge."""
    ensemble = Ensemble(members, [weights[n] for n in names])
    return evaluate(ensemble, tokenizer, sources, split, metrics=("loss", "accuracy"),
                    max_examples=max_examples, batch_size=batch_size, model_name=label)  # fmt: skip
