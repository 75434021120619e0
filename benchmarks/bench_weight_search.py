"""Weight search strategies on a finished run: grid, coordinate ascent and gradient descent.

For each strategy, on the run's own vectors, validation examples and selection metric
(``select_metric``, ``search_max_examples`` of the run's parameters): the candidates it scored,
its gradient steps, its wall time, the point at which it first reached the grid's best
validation objective (candidates, seconds, and those seconds as a share of the grid's whole
search), and the test scores of its choice. Then the same with 8 vectors — each source
fine-tuned a second time with another seed — where the grid (V^8 candidates) is only estimated
from its measured cost per candidate, and the target is the 4-vector grid's best.

The gradient searches run as chapter 04 runs them (``gradient_steps``, ``gradient_lr``,
``gradient_minibatch``, ``gradient_select_every``; chapter 04's defaults where the run's
parameters predate one). They descend the validation loss: ``--metric loss`` compares every
search on that objective, the default on the run's own ``select_metric``.

    python benchmarks/bench_weight_search.py --run runs/default [--out DIR] [--no-eight]
                                             [--metric loss]

Run it on an otherwise idle machine; timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd

from dem.chapters import experiments
from dem.chapters.notebook import setup
from dem.config import RunConfig
from dem.layout import RunLayout
from dem.merging import vectors
from dem.models import load_model
from dem.search.weights import (
    MINIMIZE,
    InMemoryMerge,
    best_weights,
    search_weights,
    validation_scorer,
)
from dem.training.finetune import finetune
from dem.training.settings import FinetuneSettings


def reached(trials: pd.DataFrame, target: float, minimize: bool) -> tuple[int | None, float | None]:
    """(candidates scored, seconds) when a search first scored at least as well as ``target``."""
    ordered = trials.sort_values("trial").reset_index(drop=True)  # in the order scored
    ok = (
        ordered["objective"] <= target + 1e-12
        if minimize
        else ordered["objective"] >= target - 1e-12
    )
    if not ok.any():
        return None, None
    first = int(ok.idxmax())
    return first + 1, float(ordered["elapsed_s"].iloc[first])


def compare(
    merger, tokenizer, run, p, names, *, grid: bool,
    target: float | None = None, grid_s: float | None = None,
) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Each search's cost, best objective, and when it first reached ``target`` (seconds also
    as a share of ``grid_s``), on this merger's vectors. With ``grid``, both are the grid's own,
    kept unrounded in the table's ``attrs`` for a comparison without a grid."""
    minimize = MINIMIZE[p["select_metric"]]
    search = dict(metric=p["select_metric"], max_examples=p["search_max_examples"] or None,
                  batch_size=p["eval_batch_size"])  # fmt: skip

    def fresh():  # a scorer of its own per search: none is answered from another's memory
        return validation_scorer(merger, tokenizer, run.train_sources, **search)

    searches = {}
    if grid:
        searches["grid"] = search_weights(fresh(), names, "grid", values=p["search_values"],
                                          minimize=minimize)  # fmt: skip
    searches["coordinate"] = search_weights(fresh(), names, "coordinate",
                                            values=p["search_values"], minimize=minimize)  # fmt: skip
    for label, granularity in [("gradient", "source"), ("gradient/layer", "layer")]:
        searches[label] = experiments.gradient_search(
            merger, tokenizer, run.train_sources, fresh(), granularity=granularity,
            steps=p["gradient_steps"], lr=p["gradient_lr"], minibatch=p["gradient_minibatch"],
            select_every=p["gradient_select_every"],
            max_examples=p["search_max_examples"] or None, minimize=minimize,
            max_length=p["max_length"])  # fmt: skip
    if grid:
        target = float(searches["grid"]["objective"].iloc[0])
        grid_s = experiments.search_cost(searches["grid"])["wall_s"]
    rows, chosen = [], {}
    for label, trials in searches.items():
        cost = experiments.search_cost(trials)
        n, s = reached(trials, target, minimize) if target is not None else (None, None)
        rows.append({"search": label, "weights": len(trials.filter(like="w_").columns),
                     "candidates": cost["candidates"], "steps": cost.get("steps", 0),
                     "wall_s": round(cost["wall_s"], 1),
                     "best_objective": round(float(trials["objective"].iloc[0]), 4),
                     "candidates_to_grid_best": n,
                     "s_to_grid_best": None if s is None else round(s, 1),
                     "share_of_grid_s": None if s is None or not grid_s else round(s / grid_s, 3)})  # fmt: skip
        chosen[label] = best_weights(trials)
    table = pd.DataFrame(rows).set_index("search")
    merges = {label: ("dem", w, {}) for label, w in chosen.items()}
    test = experiments.evaluate_merges(merger, tokenizer, merges, run.train_sources,
                                       max_examples=p["eval_max_examples"] or None,
                                       batch_size=p["eval_batch_size"])  # fmt: skip
    acc = test[test.metric == "accuracy"].groupby("model", sort=False)["value"].mean()
    table["test_accuracy"] = acc.round(4)
    if grid:
        table.attrs.update(grid_best=target, grid_s=grid_s,
                           s_per_grid_candidate=grid_s / len(searches["grid"]))  # fmt: skip
    return table, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished `dem run` folder")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the tables (default: RUN/bench, RUN/bench-METRIC with --metric)",
    )
    parser.add_argument("--no-eight", action="store_true", help="skip the 8-vector comparison")
    parser.add_argument("--metric", choices=sorted(MINIMIZE), default=None,
                        help="the validation metric every search is selected by (default: the "
                        "run's select_metric); `loss` is the one the gradient descends")  # fmt: skip
    args = parser.parse_args()
    layout = RunLayout(args.run)
    manifest = json.loads((Path(args.run) / "manifest.json").read_text())
    # the chapters' defaults under the run's own parameters: what chapters 02 and 04 used
    p = {**RunConfig().to_dict(), **manifest["parameters"], "run_dir": args.run}
    p["select_metric"] = args.metric or p["select_metric"]
    out = Path(
        args.out or Path(args.run) / ("bench" if args.metric is None else f"bench-{args.metric}")
    )
    out.mkdir(parents=True, exist_ok=True)
    run = setup(p)
    names = run.names
    model, tokenizer = load_model(str(layout.base), device=run.device)
    model.eval()

    merger = InMemoryMerge(model, {n: vectors.load_vector(layout.vector(n)) for n in names})
    four, _ = compare(merger, tokenizer, run, p, names, grid=True)
    four.to_csv(out / "weight_search_4.csv")
    print(f"\n{len(names)} vectors (validation {p['select_metric']}, "
          f"{p['search_max_examples']} examples per source):\n{four.to_string()}")  # fmt: skip
    result = {"four": four.reset_index().to_dict(orient="records"), "parameters": p}
    if not args.no_eight:
        settings = FinetuneSettings.from_params(p)
        steps = run.steps(p["finetune_steps"], p.get("source_steps", {}))
        extra = {}
        for n in names:  # a second fine-tune of each source, another seed: 2K vectors
            folder, vector = out / "ft2" / n, out / "vectors2" / n
            if not vector.exists():
                finetune(layout.base, folder, mixture={n: 1.0}, settings=settings, steps=steps[n],
                         seed=p["seed"] + 1000, source_kwargs=run.source_kwargs, replace=True,
                         progress=False)  # fmt: skip
                vectors.extract_vector(layout.base, folder, vector, overwrite=True, progress=False)
            extra[f"{n}#2"] = vectors.load_vector(vector)
        merger = InMemoryMerge(model, {**{n: vectors.load_vector(layout.vector(n)) for n in names},
                                       **extra})  # fmt: skip
        started = time.perf_counter()
        # "to grid best": to the 4-vector grid's best, on the same selection examples
        eight, _ = compare(merger, tokenizer, run, p, merger.sources, grid=False,
                           target=four.attrs["grid_best"], grid_s=four.attrs["grid_s"])  # fmt: skip
        grid_n = len(p["search_values"]) ** len(merger.sources)
        grid_s = four.attrs["s_per_grid_candidate"] * grid_n
        eight.loc["grid (estimated)"] = {"weights": len(merger.sources), "candidates": grid_n,
                                         "wall_s": round(grid_s, 1)}  # fmt: skip
        eight.to_csv(out / "weight_search_8.csv")
        print(f"\n{len(merger.sources)} vectors ({time.perf_counter() - started:.0f} s):\n"
              f"{eight.to_string()}")  # fmt: skip
        result["eight"] = eight.reset_index().to_dict(orient="records")
    (out / "weight_search.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
