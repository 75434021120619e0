"""The chapters' experiments, each one call: the merging baselines and their λ search and the
validation landscape (04), choosing a DMix ratio (05), swapping one source (06), and the
checks that a distribution vector and a streamed merge are exact (03, 04).

Every choice is made on validation; test only reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from dem import models
from dem.evaluation.evaluate import evaluate
from dem.evaluation.results import evaluate_folders
from dem.merging import vectors
from dem.merging.safetensors_io import WeightFolder
from dem.search.baselines import (  # noqa: F401 (chapter 04)
    MORE_MERGES,
    baseline_merges,
    evaluate_merges,
    lambda_search,
    lambda_searches,
)
from dem.search.ensemble import ensemble_search, evaluate_ensemble, load_members  # noqa: F401 (chapter 04)
from dem.search.weights import (
    MINIMIZE,
    InMemoryMerge,
    best_weights,
    search_weights,
    validation_scorer,
)
from dem.training.finetune import finetune
from dem.training.schedule import normalize_mixture
from dem.training.settings import FinetuneSettings

if TYPE_CHECKING:
    from dem.chapters.notebook import Run


# --- chapter 04: the weight search, the landscape, the baselines ---------------------------------
def search_cost(trials: pd.DataFrame) -> dict:
    """What a weight search cost: candidates, wall seconds, and merge time / evaluation time;
    for a gradient search also its steps and their seconds (part of the wall time)."""
    evaluating = trials["eval_s"].sum()  # 0 when every candidate was answered from memory
    overhead = trials["merge_s"].sum() / evaluating if evaluating > 0 else 0.0
    cost = {
        "candidates": len(trials),
        "wall_s": float(trials["merge_s"].sum() + trials["eval_s"].sum()),
        "merge_overhead": float(overhead),
    }
    path = trials.attrs.get("gradient_path")
    if path is not None and len(path):
        cost["steps"] = len(path)
        cost["steps_s"] = float(path["step_s"].sum())
        cost["wall_s"] += cost["steps_s"]
    return cost


def landscape(
    score,
    w: Mapping[str, float],
    x: str,
    y: str,
    values: Sequence[float],
    *,
    minimize: bool = True,
) -> pd.DataFrame:
    """The objective over a grid of the weights of sources ``x`` and ``y``, the others at ``w``."""

    def score_pair(pair: Mapping[str, float]) -> dict:
        return score({**w, x: pair[x], y: pair[y]})

    return search_weights(
        score_pair, [x, y], "grid", values=values, minimize=minimize, include_individuals=False
    )


# --- chapter 04: beyond the grid -- gradient search, per-layer weights, the output ensemble -----
def fit_examples(sources: Sequence, max_examples: int | None) -> tuple[dict[str, list], bool]:
    """The validation examples a gradient search fits on, per source, and whether they overlap
    the ones every method is selected on (the first ``max_examples``).

    Fitting many weights and selecting on the same examples would reward overfitting, so the fit
    takes the next ``max_examples`` validation examples (the rest, if fewer). Only when the
    validation split has nothing beyond the selection examples does it fit on those, and says so.
    """
    fit, overlap = {}, False
    for source in sources:
        examples = source.examples("validation")
        m = max_examples or len(examples) // 2
        rest = examples[m : 2 * m]
        if not rest:
            rest, overlap = examples[:m], True
        fit[source.name] = rest
    return fit, overlap


def gradient_search(
    merger: InMemoryMerge,
    tokenizer,
    sources: Sequence,
    score,
    *,
    granularity: str = "source",
    steps: int = 50,
    lr: float = 0.05,
    high: float = 1.5,
    minibatch: int = 8,
    select_every: int = 5,
    max_examples: int | None = None,
    minimize: bool = True,
    max_length: int = 512,
    start: float | None = None,
) -> pd.DataFrame:
    """DEM's weights by gradient descent on the validation loss, chosen among the descent's
    points by ``score`` (the search metric every method is selected by).

    One weight per source, or per source and block of layers (``granularity="layer"``), kept in
    [0, ``high``], from ``start`` (default 1/K). Each step's loss and derivative come from one
    ``minibatch`` of fit examples per source (cycled in order, so the run is deterministic),
    from :func:`fit_examples`. The table is :func:`dem.search.weights.search_weights`'s; ``attrs``
    holds the descent's path and the fit/selection split.
    """
    from dem.search.gradient import fit_batches

    fit, overlap = fit_examples(sources, max_examples)
    batches = fit_batches(tokenizer, sources, fit, batch_size=minibatch, max_length=max_length)

    def one_batch(w, step):
        chosen = {s: [b[step % len(b)]] for s, b in batches.items()}
        return merger.loss_and_gradient(w, chosen)

    trials = search_weights(score, merger.weight_names(granularity), "gradient", gradient=one_batch,
                            steps=steps, lr=lr, low=0.0, high=high, select_every=select_every,
                            start=start, minimize=minimize)  # fmt: skip
    trials.attrs.update(granularity=granularity, fit_examples=sum(map(len, fit.values())),
                        fit_overlaps_selection=overlap)  # fmt: skip
    return trials


# AdaMerging (Yang et al., ICLR 2024) as FusionBench runs it on LLMs: one coefficient per source
# and layer, trained by Adam on cross-entropy of labelled examples, clamped to [0, 1], from the
# paper's init 0.3 (FusionBench's LLM recipe: 0.5, lr 1e-4, 1000 steps).
ADAMERGING_START = 0.3


def adamerging_search(
    merger: InMemoryMerge, tokenizer, sources: Sequence, score, *, steps: int, lr: float, **options
) -> pd.DataFrame:
    """DEM's per-layer weights trained as AdaMerging trains them: ``steps`` Adam steps of size
    ``lr`` on the fit examples' loss (:func:`gradient_search` with ``granularity="layer"``),
    from every weight at :data:`ADAMERGING_START`, inside [0, 1]. Its point is scored on the
    selection examples every tenth of the run (and at its start and end) and chosen by ``score``
    with the individuals, like every candidate of every search."""
    return gradient_search(merger, tokenizer, sources, score, granularity="layer", steps=steps,
                           lr=lr, high=1.0, start=ADAMERGING_START,
                           select_every=max(1, steps // 10), **options)  # fmt: skip


def compare_searches(searches: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per weight search: the best objective it reached on the selection examples, the
    candidates it scored, its gradient steps and its wall time (steps included)."""
    rows = []
    for label, trials in searches.items():
        cost = search_cost(trials)
        rows.append({"search": label, "best_objective": float(trials["objective"].iloc[0]),
                     "candidates": cost["candidates"], "steps": cost.get("steps", 0),
                     "wall_s": round(cost["wall_s"], 1),
                     "fit_overlaps_selection": trials.attrs.get("fit_overlaps_selection")})  # fmt: skip
    return pd.DataFrame(rows).set_index("search")


def beyond_grid_record(searches: Mapping[str, pd.DataFrame], mde_trials: pd.DataFrame) -> dict:
    """The ``searches`` entry of chapter 04's settings: each search's cost, chosen weights and,
    for the ensemble, its forward passes per token (one per member with a weight)."""
    record = {label: {**search_cost(t), "weights": best_weights(t),
                      "fit_overlaps_selection": t.attrs.get("fit_overlaps_selection")}
              for label, t in searches.items()}  # fmt: skip
    w_mde = best_weights(mde_trials)
    record["mde"] = {**search_cost(mde_trials), "weights": w_mde,
                     "forward_passes": sum(x > 0 for x in w_mde.values())}  # fmt: skip
    return record


def layer_weights(w: Mapping[str, float]) -> pd.DataFrame:
    """Per-layer weights ``{"source@block": w}`` as a sources × blocks table (blocks in order)."""
    rows = [(*key.split("@", 1), value) for key, value in w.items()]
    table = pd.DataFrame(rows, columns=["source", "block", "weight"])
    return table.pivot_table(index="source", columns="block", values="weight", sort=False)


# --- chapter 05: choosing the mixture ratio ------------------------------------------------------
def choose_mixture(validation: pd.DataFrame, metric: str) -> tuple[pd.Series, str]:
    """Mean validation ``metric`` per DMix run, and the best run (lowest loss, else highest).

    Ties go to the first run in the table's order (the grid's): accuracies are counts, so two
    ratios often tie exactly, and means of the same counts summed in another order may differ
    in the last bit -- equal within 1e-9 counts as a tie. Across CPUs the runs themselves differ
    in the last bits (vector kernels reduce in another order: every fine-tune's weights differ
    between ATEN_CPU_CAPABILITY=avx512, avx2 and default, benchmarks/check_cpu_reproducibility.py),
    which can move one validation example and so the choice; that is stated, not removable.
    """
    scores = validation.groupby("model", sort=False)["value"].mean()
    best_value = scores.min() if MINIMIZE[metric] else scores.max()
    tied = scores[(scores - best_value).abs() <= 1e-9 * max(1.0, abs(best_value))]
    return scores, tied.index[0]


def dem_guided_mixture(dem_weights: Mapping[str, float]) -> dict[str, float] | None:
    """The mixture ratio DEM's chosen weights imply: w_i / Σ_j w_j per source (merges of
    per-source fine-tunes predict good ratios: Merge to Mix, 2025). None when every weight is 0
    (DEM chose the base): there is no mixture to train. A negative weight is an error."""
    if not any(dem_weights.values()):
        return None
    kept = normalize_mixture(dem_weights)
    return {name: kept.get(name, 0.0) for name in dem_weights}


GUIDED = "dmix_dem_guided"  # the DMix run at DEM's ratio: its model folder and method name


def dem_guided_dmix(
    run: Run, dem_weights: Mapping[str, float], *, settings: FinetuneSettings, **evaluation
) -> tuple[dict, dict, pd.DataFrame] | None:
    """Chapter 05's one DMix run at the ratio DEM's chosen weights imply, with ``settings`` (the
    budget of every DMix run): its mixture, its training cost and its test table (model
    ``dmix_dem_guided``); None when DEM chose every weight 0."""
    mixture = dem_guided_mixture(dem_weights)
    if mixture is None:
        return None
    folder = run.layout.dmix_model(GUIDED)
    cost = finetune(run.layout.base, folder, mixture=mixture, settings=settings,
                    source_kwargs=run.source_kwargs, custom_sources=run.custom_sources,
                    replace=True)  # fmt: skip
    test = evaluate_folders({GUIDED: folder}, run.eval_sources, "test",
                            metrics=("loss", "accuracy"), **evaluation)  # fmt: skip
    return mixture, cost, test


# --- chapter 06: swap one source -----------------------------------------------------------------
@dataclass
class SwapResult:
    """DEM after replacing one source: its new weights, test scores and what each recipe paid."""

    swap_out: str
    swap_in: str
    weights: dict[str, float]
    test: pd.DataFrame  # tidy evaluation of the new DEM model on the new sources
    cost: pd.DataFrame  # per recipe: train_tokens, wall_s

    def record(self) -> dict:
        """The ``swap`` entry of ``metrics.json``."""
        return {
            "out": self.swap_out,
            "in": self.swap_in,
            "weights": self.weights,
            "test": self.test.set_index("source")["value"].to_dict(),
            "cost": self.cost.to_dict(orient="index"),
        }


def _tune_new_source(run: Run, name: str, settings: FinetuneSettings) -> dict:
    """Fine-tune ``name`` alone and extract its vector (both replace any earlier ones); the
    fine-tune's cost."""
    layout = run.layout
    cost = finetune(layout.base, layout.ft_model(name), mixture={name: 1.0}, settings=settings,
                    source_kwargs=run.source_kwargs, custom_sources=run.custom_sources,
                    replace=True)  # fmt: skip
    vectors.extract_vector(layout.base, layout.ft_model(name), layout.vector(name),
                           overwrite=True, progress=False)  # fmt: skip
    return cost


def _swap_costs(new_cost: dict, trials: pd.DataFrame, dmix_search_cost: tuple) -> pd.DataFrame:
    """What each recipe pays to take the swap: DEM one fine-tune and a new search; DMix its
    whole ratio search again."""
    search_tokens, search_wall = dmix_search_cost
    dem_wall = new_cost["wall_s"] + trials.merge_s.sum() + trials.eval_s.sum()
    rows = [{"recipe": "DEM: one fine-tune + new search", "train_tokens": new_cost["train_tokens"],
             "wall_s": dem_wall},
            {"recipe": "DMix: repeat the ratio search", "train_tokens": search_tokens,
             "wall_s": search_wall}]  # fmt: skip
    return pd.DataFrame(rows).set_index("recipe")


def swap_source(
    run: Run,
    swap_out: str,
    swap_in: str,
    *,
    settings: FinetuneSettings,
    dmix_search_cost: tuple,
    strategy: str = "grid",
    values: Sequence[float] = (0.0, 0.5, 1.0),
    n_trials: int = 32,
    metric: str = "loss",
    max_examples: int | None = None,
    batch_size: int = 64,
    eval_max_examples: int | None = None,
) -> SwapResult:
    """Replace ``swap_out`` by ``swap_in``: one fine-tune, one vector, a new weight search.

    ``settings`` are the fine-tune's (``steps`` the budget of ``swap_in``). The other sources'
    vectors are reused. Under data mixing every run of the ratio search trains on the changed
    mixture, so its cost is ``dmix_search_cost`` (tokens, wall seconds) again: the runs have
    the same steps and batch size.
    """
    layout = run.layout
    swapped = [n for n in run.names if n != swap_out] + [swap_in]
    new_cost = _tune_new_source(run, swap_in, settings)
    model, tokenizer = models.load_model(str(layout.base), device=run.device)
    merger = InMemoryMerge(model, {n: vectors.load_vector(layout.vector(n)) for n in swapped})
    sources = [s for s in run.train_sources if s.name != swap_out] + [run.source(swap_in)]
    score = validation_scorer(merger, tokenizer, sources, metric=metric,
                              max_examples=max_examples, batch_size=batch_size)  # fmt: skip
    trials = search_weights(score, swapped, strategy, values=values, n_trials=n_trials,
                            seed=run.seed, minimize=MINIMIZE[metric])  # fmt: skip
    merger.apply(best_weights(trials))
    test = evaluate(model, tokenizer, sources, "test", metrics=("accuracy",),
                    max_examples=eval_max_examples, batch_size=batch_size,
                    model_name="dem_swapped")  # fmt: skip
    return SwapResult(swap_out, swap_in, best_weights(trials), test,
                      _swap_costs(new_cost, trials, dmix_search_cost))  # fmt: skip


# --- exactness checks (03, 04) -------------------------------------------------------------------
def reconstruction_error(
    base: str | Path, model: str | Path, vector: Mapping[str, torch.Tensor]
) -> float:
    """max |θ0 + v − θ| over every floating-point tensor of ``model`` (in float64)."""
    theta_0, theta_1 = WeightFolder(base, role="base"), WeightFolder(model)
    try:
        error = 0.0
        for name in theta_1.names:
            t1 = theta_1.tensor(name)
            if t1.is_floating_point():
                diff = theta_0.tensor(name).double() + vector[name].double() - t1.double()
                error = max(error, float(diff.abs().max()))
            theta_0.release()
            theta_1.release()
        return error
    finally:
        theta_0.close()
        theta_1.close()


def max_abs_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """The largest entry-wise difference between two models' state dicts (in float32)."""
    return max(
        float((x.float() - y.float()).abs().max())
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
