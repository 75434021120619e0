"""When does DEM work? The DMix−DEM gap of a sweep against the base's size (chapter 07).

Reads ``results.csv`` of :mod:`dem.run.sweep` (one row per cell × method) and measures, per cell,
how far DEM trails data mixing at equal training budget; then fits that gap against
log10(parameters) per budget and fine-tuning kind, with a bootstrap over seeds for the slope,
and says in words what the fit shows. Nothing here chooses a method: every accuracy is the
cell's test accuracy of a method the tutorial selected on validation data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dem import DemError, resources
from dem.search.weights import MINIMIZE

CELL = ["cell", "base", "params", "budget", "kind", "seed"]
# The merged DEM models: the paper's grid ("dem") and every other search for its weights
# ("dem_gradient", "dem_layer", "dem_tpe", ...). Not the output ensemble (mde): it is no
# single merged model and pays one forward pass per member.
DEM_VARIANTS = r"^dem($|_)"
GRID, BEST = "DMix uniform − DEM (grid)", "DMix uniform − best DEM variant"


def sweep_folder(run_dir: str | Path) -> Path:
    """A relative sweep folder is relative to the project folder: JupyterLab starts chapter
    07's kernel in ``notebooks/``, ``dem sweep`` passes an absolute path."""
    path = Path(run_dir)
    if path.is_absolute():
        return path
    here = Path.cwd()
    return (resources.ROOT if here.resolve() == resources.NOTEBOOKS.resolve() else here) / path


def load_results(run_dir: str | Path) -> pd.DataFrame:
    """The sweep's results table (``run_dir/results.csv``)."""
    path = Path(run_dir) / "results.csv"
    if not path.is_file():
        raise DemError(f"{path} not found: run `dem sweep --out {run_dir}` first")
    return pd.read_csv(path)


def show_tables_as_markdown() -> None:
    """Tables in this chapter display as Markdown too, as in chapters 01-06, so ``dem publish``
    writes Markdown tables rather than HTML (the hook lives in :mod:`dem.chapters.notebook`)."""
    from dem.chapters.display import chapter_display

    chapter_display()


def cells(results: pd.DataFrame) -> pd.DataFrame:
    """One row per finished cell: what it was, where and by which commit it ran, how long."""
    columns = [*CELL, "device", "commit", "cell_wall_s"]
    table = results.drop_duplicates("cell")
    return table[[c for c in columns if c in table]].reset_index(drop=True)


def best_on_validation(cell: pd.DataFrame, variants: str = DEM_VARIANTS) -> str:
    """The DEM variant of one cell's rows whose chosen weights scored best on validation (the
    ``validation`` column, in the cell's ``select_metric``); ties go to the first row, the grid.
    Test accuracy never enters the choice."""
    pattern = re.compile(variants)
    dem_like = cell[[bool(pattern.search(m)) for m in cell.method]].dropna(subset=["validation"])
    if dem_like.empty:
        raise DemError(f"cell {cell.cell.iloc[0]}: no DEM variant with a validation score")
    minimize = MINIMIZE[cell.select_metric.iloc[0]] if "select_metric" in cell else False
    scores = dem_like.validation.to_numpy()
    return str(dem_like.method.iloc[int(scores.argmin() if minimize else scores.argmax())])


def gaps(results: pd.DataFrame, variants: str = DEM_VARIANTS) -> pd.DataFrame:
    """Per cell and gap: DMix uniform's accuracy minus DEM's (grid) and minus the best variant.

    The best variant is the DEM variant whose weights scored best on *validation*
    (:func:`best_on_validation`), the rule that chose each variant's weights; its test accuracy
    is then reported as every method's is. Columns: the cell's, ``gap`` (GRID or BEST),
    ``value``, ``variant``.
    """
    rows = []
    for _, cell in results.groupby("cell", sort=False):
        by_method = cell.set_index("method").accuracy
        if "dem" not in by_method or "dmix_uniform" not in by_method:
            continue
        best = best_on_validation(cell, variants)
        info = cell.iloc[0][[*CELL, *(["sources"] if "sources" in cell else [])]].to_dict()
        dmix = by_method["dmix_uniform"]
        rows.append({**info, "gap": GRID, "value": dmix - by_method["dem"], "variant": "dem"})
        rows.append({**info, "gap": BEST, "value": dmix - by_method[best], "variant": best})
    if not rows:
        raise DemError("no finished cell with both dem and dmix_uniform in the results")
    return pd.DataFrame(rows)


def spread(gap_table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1) and number of seeds per base, budget, kind and gap."""
    keys = ["budget", "kind", "gap", "base", "params"]
    table = gap_table.groupby(keys, sort=False)["value"].agg(mean="mean", sd="std", seeds="count")
    return table.reset_index().sort_values(["budget", "kind", "gap", "params"], ignore_index=True)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y on x."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def bootstrap_lines(points: pd.DataFrame, n: int, seed: int) -> np.ndarray:
    """(n, 2) intercepts and slopes refitted on resampled seeds: within each base, its cells
    are drawn with replacement, so every replicate keeps every base (the x values)."""
    rng = np.random.default_rng(seed)
    groups = [g[["x", "value"]].to_numpy() for _, g in points.groupby("params", sort=True)]
    lines = np.empty((n, 2))
    for i in range(n):
        sample = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        lines[i] = _line(sample[:, 0], sample[:, 1])
    return lines


def fit_gap(
    points: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> dict:
    """gap ≈ a + b·log10(params) over one panel's cells, with a bootstrap interval for b and,
    where the line reaches 0, the parameters at which it does and that point's interval.

    ``b`` is in accuracy points (fractions) per tenfold parameters. Until every base has two
    seeds or more, a bootstrap over seeds would treat the single-seed bases as exact and give
    too narrow an interval, so the interval is reported as unknown (NaN).
    """
    points = points.assign(x=np.log10(points.params.astype(float)))
    if points.params.nunique() < 2:
        raise DemError("a fit against size needs cells at two bases or more")
    a, b = _line(points.x.to_numpy(), points.value.to_numpy())
    tail = (1 - level) / 2
    varied = points.groupby("params").size().min() >= 2
    lines = bootstrap_lines(points, n_boot, seed) if varied else None
    b_lo, b_hi = np.quantile(lines[:, 1], [tail, 1 - tail]) if varied else (np.nan, np.nan)
    fit = {"a": a, "b": b, "b_low": float(b_lo), "b_high": float(b_hi), "level": level,
           "cells": len(points), "bases": points.params.nunique(),
           "x_min": points.x.min(), "x_max": points.x.max()}  # fmt: skip
    fit.update(_crossing(a, b, lines, tail, fit))
    return fit


def _crossing(a: float, b: float, lines: np.ndarray | None, tail: float, fit: dict) -> dict:
    """Where the fitted gap is 0 (log10 params), its bootstrap interval, and whether it lies
    outside the measured sizes (an extrapolation)."""
    if b == 0 or not np.isfinite(b):
        return {"zero_at": np.nan, "zero_low": np.nan, "zero_high": np.nan, "extrapolated": None}
    x0 = -a / b
    low = high = np.nan
    if lines is not None:
        same_sign = lines[np.sign(lines[:, 1]) == np.sign(b)]
        if len(same_sign):
            low, high = np.quantile(-same_sign[:, 0] / same_sign[:, 1], [tail, 1 - tail])
    outside = not fit["x_min"] <= x0 <= fit["x_max"]
    return {"zero_at": x0, "zero_low": low, "zero_high": high, "extrapolated": outside}


def fits(gap_table: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """:func:`fit_gap` per budget, kind and gap, for the panels with two bases or more. Only
    cells on the same sources share a line: a base tuned on other tasks (the far point) is
    shown, not fitted."""
    keys = ["budget", "kind", "gap", *(["sources"] if "sources" in gap_table else [])]
    rows = []
    for group, points in gap_table.groupby(keys, sort=False):
        if points.params.nunique() >= 2:
            fit = fit_gap(points, n_boot=n_boot, seed=seed)
            rows.append({**dict(zip(keys, group, strict=True)), **fit})
    return pd.DataFrame(rows)


def _params(log10_params: float) -> str:
    value = 10**log10_params
    return f"{value / 1e9:.3g}B" if value >= 1e9 else f"{value / 1e6:.3g}M"


def verdict(fit: pd.Series | dict) -> str:
    """What one fit shows, in words: the slope with its interval, or that there is no trend."""
    fit = dict(fit)
    head = (f"budget {fit['budget']:g}×S, {fit['kind']}, {fit['gap']}: "
            f"{100 * fit['b']:+.1f} points per tenfold parameters")  # fmt: skip
    if np.isnan(fit["b_low"]):
        return head + " (a base with one seed: no interval yet, so no claim of a trend)."
    interval = (
        f" ({fit['level']:.0%} interval {100 * fit['b_low']:+.1f} to {100 * fit['b_high']:+.1f})"
    )
    if fit["b_low"] <= 0 <= fit["b_high"]:
        return head + interval + ": the interval includes 0, so no trend is measured."
    direction = "shrinks" if fit["b"] < 0 else "grows"
    text = head + interval + f": the gap {direction} with size."
    if fit["b"] < 0 and np.isfinite(fit["zero_at"]):
        where = (
            "an extrapolation beyond the measured sizes"
            if fit["extrapolated"]
            else "inside the measured sizes"
        )
        span = ""
        if np.isfinite(fit["zero_low"]):
            span = f", {fit['level']:.0%} interval {_params(fit['zero_low'])}–{_params(fit['zero_high'])}"
        text += (
            f" The line reaches 0 at about {_params(fit['zero_at'])} parameters{span} ({where})."
        )
    return text


def summary_words(gap_table: pd.DataFrame, fit_table: pd.DataFrame) -> str:
    """The measurement in words: the gap per base (mean ± sd over seeds), then every fit."""
    lines = []
    for row in spread(gap_table).itertuples():
        sd = "" if np.isnan(row.sd) else f" ± {100 * row.sd:.1f}"
        lines.append(f"- {row.base} ({row.params / 1e6:.2f}M), budget {row.budget:g}×S, "
                     f"{row.kind}, {row.gap}: {100 * row.mean:.1f}{sd} points "
                     f"({row.seeds} seed{'s' if row.seeds > 1 else ''})")  # fmt: skip
    lines += [f"- {verdict(fit)}" for _, fit in fit_table.iterrows()]
    if fit_table.empty:
        lines.append("- No panel has two bases yet: no fit against size.")
    return "\n".join(lines)


def best_variants(gap_table: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Per cell, the DEM variant chosen on validation, its validation score, its test accuracy
    and its search cost (candidates, seconds)."""
    best = gap_table[gap_table.gap == BEST][CELL + ["variant"]]
    cost = results[["cell", "method", "validation", "accuracy", "search_candidates", "search_s"]]
    return best.merge(cost, left_on=["cell", "variant"], right_on=["cell", "method"]).drop(
        columns="method"
    )


def vector_summary(run_dir: str | Path) -> pd.DataFrame:
    """Per cell, the mean of each diagnostic over sources or pairs (``diagnostics.csv``):
    ‖v_i‖/‖θ0‖, the vectors' cosine and the merge gap (nats), beside the cell's DEM gap."""
    table = pd.read_csv(Path(run_dir) / "diagnostics.csv")
    wide = table.pivot_table(index=CELL, columns="quantity", values="value", aggfunc="mean")
    wide = wide.reset_index().rename_axis(columns=None)
    return wide.sort_values(["budget", "kind", "params"], ignore_index=True)


def panels(gap_table: pd.DataFrame) -> list[tuple[float, str]]:
    """The (budget, kind) panels present, budgets ascending, kinds in first-seen order."""
    kinds: Sequence[str] = list(dict.fromkeys(gap_table.kind))
    found = set(zip(gap_table.budget, gap_table.kind, strict=True))
    return [(b, k) for k in kinds for b in sorted(set(gap_table.budget)) if (b, k) in found]


# DMix at three ratios, each a whole training run: equal (uniform), the ratio search's pick on
# validation (best), and the ratio DEM's chosen weights imply, normalized (dem_guided).
MIXING = ("dmix_uniform", "dmix_dem_guided", "dmix_best")


def guided_mixing(results: pd.DataFrame) -> pd.DataFrame:
    """Per base, budget and kind: each DMix ratio's test accuracy (mean over seeds) and the
    training tokens it cost, the ratio search's counted with all the runs it chose among."""
    rows = results[results.method.isin(MIXING)]
    if rows.empty:
        raise DemError("no DMix methods in the results")
    keys = ["base", "params", "budget", "kind", "method"]
    table = rows.groupby(keys, sort=False).agg(
        accuracy=("accuracy", "mean"),
        train_tokens=("train_tokens", "mean"),
        seeds=("seed", "count"),
    )
    wide = table.unstack("method")
    wide.columns = [f"{m}_{q}" for q, m in wide.columns]
    return wide.reset_index().sort_values(["budget", "kind", "params"], ignore_index=True)


def method_means(results: pd.DataFrame) -> pd.DataFrame:
    """Every method's test accuracy, mean over seeds: one row per method, one column per base,
    budget and kind (``h64 1×S full``), methods in the order the cells list them."""
    table = results.assign(panel=results.base + " " + results.budget.map("{:g}×S".format) + " "
                           + results.kind)  # fmt: skip
    order = list(dict.fromkeys(table.method))
    panels_ = list(dict.fromkeys(table.sort_values(["budget", "kind", "params"]).panel))
    wide = table.pivot_table(index="method", columns="panel", values="accuracy", aggfunc="mean")
    return wide.loc[order, panels_].rename_axis(columns=None)
