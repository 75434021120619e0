"""Evaluate model folders and assemble the results of a run: ``metrics.json``, its table, the
cost of each method and the paper's claims checked on the run (chapter 06).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dem import DemError, progress
from dem.io import atomic_file
from dem.layout import RunLayout
from dem.model_card import CARD, write_card
from dem.records import DMixRecord, MergeRecord, read_table


def write_table(table: pd.DataFrame, path: str | Path, **to_csv) -> Path:
    """``table.to_csv(path, **to_csv)``, atomically (a reader never sees half a table)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        table.to_csv(tmp, **to_csv)
    return path


def evaluate_folders(
    folders: Mapping[str, str | Path],
    sources: Sequence,
    split: str,
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
    max_examples: int | None = None,
    batch_size: int = 64,
    device=None,
) -> pd.DataFrame:
    """Load each model folder in turn and evaluate it; one tidy table (model, source, ...)."""
    from dem.evaluation.evaluate import evaluate
    from dem.models import load_model

    tables = []
    for name, folder in progress.bar(folders.items(), desc=f"evaluating on {split}", unit="model",
                                     total=len(folders), leave=False):  # fmt: skip
        model, tokenizer = load_model(str(folder), device=device)
        tables.append(
            evaluate(
                model,
                tokenizer,
                list(sources),
                split,
                metrics=tuple(metrics),
                max_examples=max_examples,
                batch_size=batch_size,
                model_name=name,
            )
        )
        del model
    return pd.concat(tables, ignore_index=True)


def score_matrix(table: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Pivot a tidy evaluation table to models × sources for one metric (order kept)."""
    rows = table[table["metric"] == metric]
    matrix = rows.pivot_table(index="model", columns="source", values="value", sort=False)
    return matrix


def method_entry(
    test: Mapping[str, float],
    sources: Sequence[str],
    *,
    composite: float | None,
    train_tokens: float,
    wall_s: float,
    forward_passes: int = 1,
) -> dict:
    """One method's record in ``metrics.json``: test scores, their average, composite, cost
    (training tokens, wall seconds, and forward passes per generated token at inference)."""
    missing = [s for s in sources if s not in test]
    if missing:
        raise DemError(f"no test score for source(s) {missing}")
    scores = {s: float(test[s]) for s in sources}
    return {
        "test": scores,
        "average": sum(scores.values()) / len(scores),
        "composite": None if composite is None else float(composite),
        "cost": {
            "train_tokens": int(train_tokens),
            "wall_s": round(float(wall_s), 2),
            "forward_passes": int(forward_passes),
        },  # fmt: skip
    }


def metrics_table(metrics: Mapping) -> pd.DataFrame:
    """``metrics.json`` as a table: one row per method, one column per source plus summary."""
    rows = []
    for name, entry in metrics["methods"].items():
        row = {
            "method": name,
            **entry["test"],
            "average": entry["average"],
            "composite": entry["composite"],
            **entry["cost"],
        }
        rows.append(row)
    return pd.DataFrame(rows).set_index("method")


def summary_text(metrics: Mapping) -> str:
    """The result table as plain text for a terminal: per method the mean test score, each
    source's, the composite set and the training tokens; best average first."""
    table = metrics_table(metrics)
    columns = ["average", *metrics["sources"], "composite", "train_tokens"]
    table = table[columns].sort_values("average", ascending=False, kind="stable")
    metric = metrics.get("metric", "accuracy")
    text = table.to_string(
        float_format=lambda x: f"{x:.3f}",
        formatters={"train_tokens": lambda x: f"{x:,.0f}"},
        na_rep="-",
    )
    return f"test {metric}, mean over {len(metrics['sources'])} sources (best first):\n{text}"


@dataclass
class ChapterResults:
    """What chapters 02 to 05 measured, read back from the run folder: score and cost tables
    (one row per model) and the records of chapters 04 and 05, read by field."""

    scores: pd.DataFrame  # every test evaluation: model, source, metric, value
    ft_costs: pd.DataFrame  # per-source fine-tunes (02), indexed by source
    merge: MergeRecord  # 04: DEM's weights, the λs, what each search cost
    merged: list[str]  # 04: every method it scored, in its order
    dmix: DMixRecord  # 05: the DMix runs and which is uniform, best and DEM-guided
    dmix_costs: pd.DataFrame  # 05: cost of every DMix run, indexed by label
    relative_norms: pd.DataFrame  # 03: ‖v_i‖ / ‖θ0‖ per source
    barriers: pd.DataFrame | None  # 03: loss barrier between each pair of fine-tunes (if run)
    merge_gaps: pd.DataFrame | None  # 03: best loss between two fine-tunes minus the experts'

    @classmethod
    def load(cls, layout: RunLayout) -> ChapterResults:
        tables = {n: read_table(layout, n) for n in ("02_individual_test", "04_merge_test",
                                                     "05_dmix_test")}  # fmt: skip
        dmix = DMixRecord.load(layout)
        costs = [read_table(layout, "05_dmix_costs")]
        if dmix.guided:
            costs.append(read_table(layout, "05_dmix_dem_guided_cost"))
        return cls(
            scores=pd.concat(tables.values(), ignore_index=True),
            ft_costs=read_table(layout, "02_finetune_costs"),
            merge=MergeRecord.load(layout),
            merged=list(dict.fromkeys(tables["04_merge_test"].model)),
            dmix=dmix,
            dmix_costs=pd.concat(costs),
            relative_norms=read_table(layout, "03_relative_norms"),
            barriers=read_table(layout, "03_barriers", optional=True),
            merge_gaps=read_table(layout, "03_merge_gaps", optional=True),
        )

    @property
    def accuracy(self) -> pd.DataFrame:
        """Test accuracy, models × sources."""
        acc = self.scores[self.scores.metric == "accuracy"]
        return acc.pivot_table(index="model", columns="source", values="value", sort=False)

    @property
    def finetunes_cost(self) -> tuple:
        """(training tokens, wall seconds) of the K per-source fine-tunes together."""
        return self.ft_costs.train_tokens.sum(), self.ft_costs.wall_s.sum()

    @property
    def dmix_search_cost(self) -> tuple:
        """(training tokens, wall seconds) of every run of the DMix ratio search."""
        search = self.dmix_costs.loc[list(self.dmix.runs)]
        return search.train_tokens.sum(), search.wall_s.sum()

    def model_of(self, method: str) -> str:
        """The model (row of :attr:`accuracy`) a method of ``metrics.json`` reports."""
        dmix = {"dmix_uniform": self.dmix.uniform, "dmix_best": self.dmix.best}
        if self.dmix.guided:
            dmix["dmix_dem_guided"] = self.dmix.guided
        return dmix.get(method, method)


def _by_pair(table: pd.DataFrame | None, column: str) -> dict | None:
    if table is None:
        return None
    return dict(zip(table.pair, table[column].astype(float), strict=True))


def method_costs(results: ChapterResults, names: Sequence[str]) -> dict[str, tuple]:
    """(training tokens, wall seconds[, forward passes]) per method, beyond the shared base.

    Every method chapter 04 scored is reported: DEM pays the K fine-tunes plus its grid search,
    a search beyond the grid (``searches`` of its record) the fine-tunes plus its own search, any
    other merge the K fine-tunes. The best DMix pays **all** runs of its ratio search (that is
    what finding the ratio took); the uniform DMix its one run; the DEM-guided DMix DEM's
    fine-tunes and grid search (they gave its ratio) plus its one run. The output ensemble also
    pays at inference: one forward pass per member it uses.
    """
    dem_tokens, dem_wall = results.finetunes_cost
    grid_wall = results.merge.search["wall_s"]
    costs = {"base": (0, 0)}
    costs |= {f"individual/{n}": tuple(results.ft_costs.loc[n, ["train_tokens", "wall_s"]])
              for n in names}  # fmt: skip
    for method in results.merged:
        search = results.merge.searches.get(method)
        if method == "dem":
            costs[method] = (dem_tokens, dem_wall + grid_wall)
        elif search is not None:
            costs[method] = (
                dem_tokens,
                dem_wall + search["wall_s"],
                search.get("forward_passes", 1),
            )
        else:
            costs[method] = (dem_tokens, dem_wall)
    dmix = results.dmix_costs
    costs["dmix_uniform"] = tuple(dmix.loc[results.dmix.uniform, ["train_tokens", "wall_s"]])
    costs["dmix_best"] = results.dmix_search_cost
    if results.dmix.guided:
        guided = dmix.loc[results.dmix.guided]
        costs["dmix_dem_guided"] = (dem_tokens + guided.train_tokens,
                                    dem_wall + grid_wall + guided.wall_s)  # fmt: skip
    _check_every_model_reported(results, costs)
    return costs


def _check_every_model_reported(results: ChapterResults, costs: Mapping[str, tuple]) -> None:
    """A scored model no method reports is an error, never a silent drop (the ratio search's
    runs other than the chosen ones are reported through dmix_best)."""
    reported = {results.model_of(m) for m in costs} | set(results.dmix.runs)
    dropped = [m for m in results.accuracy.index if m not in reported]
    if dropped:
        raise DemError(f"scored but reported by no method: {dropped}; give them a cost rule in "
                       "dem.evaluation.results.method_costs")  # fmt: skip


def build_metrics(results: ChapterResults, names: Sequence[str], composite: str = "") -> dict:
    """The content of ``metrics.json``: one :func:`method_entry` per method, and the cost ratio."""
    acc = results.accuracy
    methods = {}
    for method, (tokens, wall, *passes) in method_costs(results, names).items():
        row = acc.loc[results.model_of(method)]
        methods[method] = method_entry(
            row,
            names,
            composite=row.get(composite) if composite else None,
            train_tokens=tokens,
            wall_s=wall,
            forward_passes=passes[0] if passes else 1,
        )
    dem_tokens = results.finetunes_cost[0]
    search_tokens = results.dmix_search_cost[0]
    return {
        "sources": list(names),
        "composite_source": composite or None,
        "metric": "accuracy",
        "methods": methods,
        "dem_weights": results.merge.dem_weights,
        "dmix_best_ratio": results.dmix.best,
        "cost_ratio_dmix_search_over_dem": float(search_tokens / dem_tokens),
        "vectors": {
            "relative_norm": dict(
                zip(
                    results.relative_norms.source,
                    results.relative_norms.relative.astype(float),
                    strict=True,
                )
            ),
            "barrier": _by_pair(results.barriers, "barrier"),
            "merge_gap": _by_pair(results.merge_gaps, "gap"),
        },
    }


def method_folders(layout: RunLayout, results: ChapterResults, metrics: Mapping) -> dict:
    """``{method: model folder}`` for every method of ``metrics.json`` whose model the run saved:
    the base, the fine-tunes, the DEM merge and the DMix runs (the other merges are scored in
    memory and have no folder)."""
    folders = {"base": layout.base, "dem": layout.dem_model}
    folders |= {f"individual/{s}": layout.ft_model(s) for s in metrics["sources"]}
    for method in ("dmix_uniform", "dmix_best", "dmix_dem_guided"):
        if method in metrics["methods"]:
            folders[method] = layout.dmix_model(results.model_of(method))
    return {m: f for m, f in folders.items() if m in metrics["methods"] and f.is_dir()}


def score_cards(layout: RunLayout, results: ChapterResults, metrics: Mapping) -> list[Path]:
    """Rewrite the card (README.md) of every model folder the run made with the test scores
    ``metrics.json`` holds for it. The written cards' paths."""
    metric, written = metrics.get("metric", "accuracy"), []
    for method, folder in method_folders(layout, results, metrics).items():
        entry = metrics["methods"][method]
        if method == "base" or not (folder / CARD).is_file():  # cards dem wrote for its models
            continue
        scores = {f"{source} test {metric}": v for source, v in entry["test"].items()}
        scores[f"mean test {metric}"] = entry["average"]  # one model may report two methods
        written.append(write_card(folder, scores))
    return written


def method_summary(layout: RunLayout, names: Sequence[str], methods: Sequence[str]) -> pd.DataFrame:
    """Some methods' mean test accuracy and training cost, counted as chapter 06 counts them
    (:func:`build_metrics` on what the chapters so far wrote)."""
    table = metrics_table(build_metrics(ChapterResults.load(layout), names))
    return table.loc[
        [m for m in methods if m in table.index], ["average", "train_tokens", "wall_s"]
    ]


def scores_by_method(results: ChapterResults, metrics: Mapping) -> pd.DataFrame:
    """Test accuracy per method and source, long (method, source, score), for the bar chart."""
    methods, names = list(metrics["methods"]), metrics["sources"]
    wide = results.accuracy.loc[[results.model_of(m) for m in methods], names].copy()
    wide.index = methods
    return wide.reset_index(names="method").melt(
        id_vars="method", var_name="source", value_name="score"
    )


def claims(metrics: Mapping) -> pd.DataFrame:
    """The goals of a faithful reproduction, each computed from ``metrics.json`` as it is."""
    methods, names = metrics["methods"], metrics["sources"]
    dem_row, best_row = methods["dem"], methods["dmix_best"]
    dem_tokens, search_tokens = dem_row["cost"]["train_tokens"], best_row["cost"]["train_tokens"]
    uniform_row = methods["dmix_uniform"]
    rows = [
        {
            "claim": "DEM average ≥ DMix uniform average (equal training budget)",
            "dem": dem_row["average"],
            "reference": uniform_row["average"],
            "holds": dem_row["average"] >= uniform_row["average"],
        },
        {
            "claim": "DEM average ≥ best DMix average",
            "dem": dem_row["average"],
            "reference": best_row["average"],
            "holds": dem_row["average"] >= best_row["average"],
        },
        {
            "claim": "DEM training cost ≤ 1/3 of the DMix ratio search",
            "dem": dem_tokens,
            "reference": search_tokens / 3,
            "holds": dem_tokens <= search_tokens / 3,
        },
    ]
    for n in names:
        own = methods[f"individual/{n}"]["test"][n]
        rows.append(
            {
                "claim": f"DEM within 5 points of individual/{n} on {n}",
                "dem": dem_row["test"][n],
                "reference": own - 0.05,
                "holds": dem_row["test"][n] >= own - 0.05,
            }
        )
    composite = metrics.get("composite_source")
    if composite and dem_row.get("composite") is not None:
        best_individual = max(methods[f"individual/{n}"]["composite"] for n in names)
        rows.append(
            {
                "claim": f"DEM on {composite} above every individual model",
                "dem": dem_row["composite"],
                "reference": best_individual,
                "holds": dem_row["composite"] > best_individual,
            }
        )
    return pd.DataFrame(rows)
