"""Chapter 04's merging baselines: DEM's rivals built from the same K fine-tunes, each with one
scale λ shared by every source and chosen on validation by the rule every method follows.

How λ enters depends on the method. Task arithmetic and DARE add w_i·v_i, so λ is every w_i.
TIES and DELLA divide their merged vector by the weights (Σ_{i∈A} w_i, as mergekit), so equal
weights of any size give the same model: there λ is the method's own scale ``lam`` and every
w_i = 1, which is the papers' θ0 + λ·τ_m. Breadcrumbs takes the same form. Model Stock chooses
its own scale from the vectors' angles (w_i = 1/K, as its paper), so it has no λ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from dem import DemError
from dem.evaluation.evaluate import evaluate
from dem.merging.methods import get_method
from dem.search.weights import MINIMIZE, InMemoryMerge, search_weights, validation_scorer

# Further baselines of dem.merging.methods that chapter 04 can add (its `more_merges`), each at its
# method's defaults (dem merge --help lists them) and with DELLA's seed the run's. SLERP merges
# two models only, so it is not a K-source baseline.
MORE_MERGES = ("breadcrumbs", "della", "model_stock")
# label -> the method of dem.merging.methods behind it
METHOD_OF = {"task_arithmetic": "dem", "dare": "dare_linear"}


def shared_lambda(
    method: str, names: Sequence[str], lam: float, options: Mapping | None = None
) -> tuple[dict[str, float], dict]:
    """(weights, options) of ``method`` at one λ shared by every source
    (:attr:`dem.merging.methods.Method.shared_scale` says where λ goes)."""
    options = dict(options or {})
    scale = get_method(method).shared_scale
    if scale is None:
        raise DemError(f"method {method!r} sets its own scale: it takes no shared λ")
    if scale == "lam":
        return dict.fromkeys(names, 1.0), {**options, "lam": float(lam)}
    return dict.fromkeys(names, float(lam)), options


def lambda_search(
    merger: InMemoryMerge,
    tokenizer,
    sources: Sequence,
    lambdas: Sequence[float],
    method: str,
    *,
    metric: str = "loss",
    max_examples: int | None = None,
    batch_size: int = 64,
    **options,
) -> float:
    """The λ of ``method`` (one scale shared by every source) that scores best on validation."""
    names = [s.name for s in sources]
    score = validation_scorer(merger, tokenizer, sources, metric=metric, max_examples=max_examples,
                              batch_size=batch_size, method=method)  # fmt: skip

    def score_lambda(candidate: Mapping[str, float]) -> dict:
        weights, merged_options = shared_lambda(method, names, candidate["lambda"], options)
        return score(weights, **merged_options)

    table = search_weights(score_lambda, ["lambda"], "grid", values=lambdas,
                           minimize=MINIMIZE[metric], include_individuals=False)  # fmt: skip
    return float(table.iloc[0]["w_lambda"])


def method_options(
    label: str, *, ties_density: float, dare_drop_prob: float, seed: int
) -> tuple[str, dict]:
    """(method, options) of a baseline label: the chapter's densities, the run's seed."""
    method = METHOD_OF.get(label, label)
    options = {"ties": {"density": ties_density},
               "dare": {"drop_prob": dare_drop_prob, "seed": seed}}.get(label, {})  # fmt: skip
    if get_method(method).random and "seed" not in options:
        options["seed"] = seed
    return method, options


def baseline_merges(
    names: Sequence[str],
    w: Mapping[str, float],
    lam: Mapping[str, float],
    *,
    ties_density: float,
    dare_drop_prob: float,
    seed: int,
    more: Sequence[str] = (),
) -> dict[str, tuple[str, dict, dict]]:
    """DEM and the merging baselines as {label: (method, weights, options)}.

    ``w`` are DEM's searched weights; ``lam`` the λ chosen for task arithmetic, TIES, DARE and
    each of ``more`` that has one (:data:`MORE_MERGES`). The uniform average (model soup) is
    DEM with every w_i = 1/K; Model Stock takes w_i = 1/K too.
    """
    uniform = {n: 1 / len(names) for n in names}
    merges = {"dem": ("dem", dict(w), {}), "average": ("dem", uniform, {})}
    for label in ("task_arithmetic", "ties", "dare", *more):
        method, options = method_options(label, ties_density=ties_density,
                                         dare_drop_prob=dare_drop_prob, seed=seed)  # fmt: skip
        if get_method(method).shared_scale is None:
            merges[label] = (method, dict(uniform), options)
        elif label not in lam:
            raise DemError(f"no λ given for the baseline {label!r} (given: {sorted(lam)})")
        else:
            merges[label] = (method, *shared_lambda(method, names, lam[label], options))
    return merges


def lambda_searches(
    merger: InMemoryMerge,
    tokenizer,
    sources: Sequence,
    lambdas: Sequence[float],
    labels: Sequence[str],
    *,
    ties_density: float,
    dare_drop_prob: float,
    seed: int,
    **search,
) -> dict[str, float]:
    """λ on validation for each baseline label whose method takes one (all but Model Stock)."""
    chosen = {}
    for label in labels:
        method, options = method_options(label, ties_density=ties_density,
                                         dare_drop_prob=dare_drop_prob, seed=seed)  # fmt: skip
        if get_method(method).shared_scale is None:
            continue  # Model Stock: its scale comes from the vectors' angles
        chosen[label] = lambda_search(merger, tokenizer, sources, lambdas, method,
                                      **search, **options)  # fmt: skip
    return chosen


def evaluate_merges(
    merger: InMemoryMerge,
    tokenizer,
    merges: Mapping[str, tuple[str, Mapping, Mapping]],
    sources: Sequence,
    split: str = "test",
    *,
    max_examples: int | None = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Set the model to each merge of ``merges`` in turn and evaluate it; one tidy table."""
    tables = []
    for label, (method, weights, options) in merges.items():
        merger.set_merge(method, weights, **options)
        tables.append(
            evaluate(
                merger.model,
                tokenizer,
                sources,
                split,
                metrics=("loss", "accuracy"),
                max_examples=max_examples,
                batch_size=batch_size,
                model_name=label,
            )
        )
    return pd.concat(tables, ignore_index=True)
