"""The tutorial's figures, drawn with seaborn from the tidy tables the other modules return.

Each function returns a matplotlib Figure; :func:`save` writes it to a PNG file (atomically,
so a half-drawn PNG never sits in a run folder; ``RunLayout.figure(name)`` names the file).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND") and not os.environ.get("DISPLAY"):
    matplotlib.use("agg")  # headless (papermill, CI): render to files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from dem.io import atomic_file  # noqa: E402

THEME = {"style": "whitegrid", "context": "notebook"}


def use_theme() -> None:
    """The seaborn theme of every figure of the tutorial (set on import as well)."""
    sns.set_theme(**THEME)


use_theme()


def save(fig: plt.Figure, path: str | Path):
    """Save ``fig`` as the PNG file ``path``; return it as an image a notebook shows.

    Returning the saved PNG (not the live figure) shows the same picture whatever matplotlib
    backend the kernel runs (``agg`` when executed headless), and the figure is closed so a
    long notebook does not accumulate open figures.
    """
    from IPython.display import Image

    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Image(filename=str(path))


def lengths(encoded_lengths: pd.DataFrame) -> plt.Figure:
    """Token length distribution per source (columns: source, part, tokens)."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.boxplot(data=encoded_lengths, x="tokens", y="source", hue="part", ax=ax)
    ax.set(xlabel="tokens per example", ylabel="", title="Example lengths by source")
    return fig


def loss_curves(logs: pd.DataFrame, value: str = "loss") -> plt.Figure:
    """Training curves (columns: run, step, ``value``)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.lineplot(data=logs, x="step", y=value, hue="run", ax=ax)
    ax.set(title=f"{value.replace('_', ' ')} during fine-tuning")
    return fig


def gradient_paths(paths: dict[str, pd.DataFrame]) -> plt.Figure:
    """The gradient weight search's minibatch loss per step, one line per search (a path table
    per label: step, loss)."""
    long = pd.concat([p[["step", "loss"]].assign(search=label) for label, p in paths.items()])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.lineplot(data=long, x="step", y="loss", hue="search", ax=ax)
    ax.set(title="Gradient weight search: validation loss (fit minibatches)", ylabel="loss")
    return fig


def score_heatmap(table: pd.DataFrame, title: str, fmt: str = ".2f", **kwargs) -> plt.Figure:
    """A matrix (rows × columns) of scores with the numbers written in."""
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * table.shape[1], 0.8 + 0.5 * table.shape[0]))
    sns.heatmap(table, annot=True, fmt=fmt, cmap="viridis", ax=ax, **kwargs)
    ax.set(title=title, xlabel="", ylabel="")
    return fig


def layer_norms(norms: pd.DataFrame) -> plt.Figure:
    """Distribution vector norm per layer group (columns: source, layer, norm)."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    sns.barplot(data=norms, x="layer", y="norm", hue="source", ax=ax)
    ax.set(title="How far each fine-tune moved each layer", xlabel="", ylabel="‖v‖₂")
    ax.tick_params(axis="x", rotation=45)
    return fig


def straight_paths(path: pd.DataFrame) -> plt.Figure:
    """Validation loss of each source along θ0 + t·vᵢ, one panel per vector (tidy table)."""
    grid = sns.relplot(
        data=path,
        x="t",
        y="loss",
        hue="source",
        col="vector",
        kind="line",
        marker="o",
        height=2.6,
        aspect=1.0,
        facet_kws={"sharey": True},
    )
    grid.set_titles("θ0 + t·v[{col_name}]")
    grid.figure.suptitle("validation loss along each straight path from θ0", y=1.04)
    return grid.figure


def between_fine_tunes(path: pd.DataFrame) -> plt.Figure:
    """Loss on the straight line θᵢ → θⱼ for each pair (columns: pair, s, loss)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.lineplot(data=path, x="s", y="loss", hue="pair", marker="o", ax=ax)
    ax.set(
        title="between two fine-tunes: θ0 + (1−s)·vᵢ + s·vⱼ",
        xlabel="s",
        ylabel="validation loss of sources i and j",
    )
    return fig


def landscape(trials: pd.DataFrame, x: str, y: str, value: str = "objective") -> plt.Figure:
    """Validation objective over the weights of two sources."""
    grid = trials.pivot_table(index=f"w_{y}", columns=f"w_{x}", values=value).sort_index(
        ascending=False
    )
    fig = score_heatmap(grid, f"validation {value} over w_{x} × w_{y}", fmt=".3g")
    fig.axes[0].set(xlabel=f"w_{x}", ylabel=f"w_{y}")
    return fig


def grouped_bars(scores: pd.DataFrame) -> plt.Figure:
    """Test score per method and source (columns: method, source, score): one row of bars per
    method, so long method names read horizontally and never overlap."""
    n_methods = scores["method"].nunique()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.42 * n_methods))
    sns.barplot(data=scores, y="method", x="score", hue="source", orient="h", ax=ax)
    ax.set(title="Test score by method and source", ylabel="", xlim=(0, 1))
    ax.legend(bbox_to_anchor=(1.01, 1), loc="upper left")
    return fig


def _spread(values: list[float], gap: float) -> list[float]:
    """Label positions near ``values`` (sorted ascending) at least ``gap`` apart.

    Hand-written: a one-dimensional version of what label-repel packages do, for the few
    labels that share one x in the cost plot (the merges all cost the K fine-tunes).
    """
    placed: list[float] = []
    for v in values:
        placed.append(max(v, placed[-1] + gap) if placed else v)
    shift = (placed[-1] - values[-1]) / 2 if placed else 0.0  # centre the stack on the points
    return [p - shift for p in placed]


def cost_vs_quality(summary: pd.DataFrame) -> plt.Figure:
    """Average test score against training tokens (columns: method, train_tokens, average).

    The labels stand in one column right of the points, ordered by score and spaced so that
    none overlap (the merges all share one cost), each joined to its point by a thin line."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sns.scatterplot(data=summary, x="train_tokens", y="average", hue="method", s=70, ax=ax)
    ordered = summary.sort_values("average", kind="stable")
    span = max(float(ordered["average"].iloc[-1] - ordered["average"].iloc[0]), 0.05)
    column = float(summary["train_tokens"].max()) * 3
    for row, y in zip(ordered.itertuples(), _spread(list(ordered.average), span / 20), strict=True):
        ax.annotate(
            row.method,
            (max(row.train_tokens, 1), row.average),
            xytext=(column, y),
            fontsize=8,
            va="center",
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"},
        )
    ax.set(
        xscale="log",
        xlabel="training tokens (log)",
        ylabel="average test score",
        title="Cost vs quality",
    )
    ax.set_xlim(right=column * 12)
    ax.legend([], frameon=False)
    return fig


def gap_vs_params(gap_table: pd.DataFrame, fit_table: pd.DataFrame) -> plt.Figure:
    """DMix − DEM accuracy gap against base parameters (log), one panel per budget and kind:
    every seed as a dot, mean ± sd per base, the fitted line over the measured sizes and,
    dashed, its extension to where it reaches 0 (an extrapolation, its interval as a bar).
    Columns as :func:`dem.chapters.scale.gaps` and :func:`dem.chapters.scale.fits` return them."""
    from dem.chapters.scale import panels, spread

    chosen = panels(gap_table)
    fig, axes = plt.subplots(1, len(chosen), figsize=(5.2 * len(chosen), 4), squeeze=False,
                             sharey=True)  # fmt: skip
    colors = dict(zip(dict.fromkeys(gap_table.gap), sns.color_palette(n_colors=2), strict=False))
    summary = spread(gap_table)
    for ax, (budget, kind) in zip(axes[0], chosen, strict=True):
        for gap, color in colors.items():
            dots = gap_table[(gap_table.budget == budget) & (gap_table.kind == kind)
                             & (gap_table.gap == gap)]  # fmt: skip
            ax.scatter(dots.params, dots.value, color=color, alpha=0.35, s=18)
            mean = summary[
                (summary.budget == budget) & (summary.kind == kind) & (summary.gap == gap)
            ]
            ax.errorbar(mean.params, mean["mean"], yerr=mean.sd.fillna(0), color=color, marker="o",
                        linestyle="none", capsize=3, label=gap)  # fmt: skip
            _name_unfitted(ax, dots, mean, color)
            fit = fit_table[(fit_table.budget == budget) & (fit_table.kind == kind)
                            & (fit_table.gap == gap)] if len(fit_table) else fit_table  # fmt: skip
            for row in fit.itertuples():
                _fit_line(ax, row, color, label_at=6 + 12 * list(colors).index(gap))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xscale="log", xlabel="base parameters (log)", title=f"budget {budget:g}×S, {kind}")
        # ticks at the measured sizes: a panel spanning less than a decade has no power of ten
        sizes = sorted(
            gap_table[(gap_table.budget == budget) & (gap_table.kind == kind)].params.unique()
        )
        ax.set_xticks(sizes, labels=[f"{p / 1e6:.3g}M" for p in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0, 0].set_ylabel("DMix uniform − DEM (test accuracy, fraction)")
    axes[0, -1].legend(loc="best", fontsize=8)
    return fig


def _name_unfitted(ax: plt.Axes, dots: pd.DataFrame, mean: pd.DataFrame, color) -> None:
    """Name the bases tuned on other sources than the panel's most common set (the far point):
    they stand beside the line, not on it."""
    if "sources" not in dots or dots.empty:
        return
    usual = dots.sources.mode().iloc[0]
    for base in dots[dots.sources != usual].base.unique():
        row = mean[mean.base == base].iloc[0]
        ax.annotate(f"{base}\n(own sources)", (row.params, row["mean"]), textcoords="offset points",
                    xytext=(-6, 6), fontsize=8, color=color, ha="right")  # fmt: skip


def _fit_line(ax: plt.Axes, fit, color, label_at: float = 6) -> None:
    """The fitted line over the measured sizes; dashed to its zero crossing, when the gap
    shrinks with size and reaches 0 within four decades beyond them (the paper's 3B-13B from a 2.6M base), with the
    crossing's bootstrap interval as a bar."""
    xs = np.linspace(fit.x_min, fit.x_max, 20)
    ax.plot(10**xs, fit.a + fit.b * xs, color=color, linewidth=1.5)
    # Only a gap that shrinks with size reaches 0 at larger bases, the question asked here.
    if fit.b >= 0 or not fit.extrapolated or not np.isfinite(fit.zero_at):
        return
    if not (fit.x_min - 4 <= fit.zero_at <= fit.x_max + 4):
        return
    ends = np.linspace(fit.x_max if fit.zero_at > fit.x_max else fit.x_min, fit.zero_at, 20)
    ax.plot(10**ends, fit.a + fit.b * ends, color=color, linewidth=1.2, linestyle="--")
    if np.isfinite(fit.zero_low):
        ax.errorbar([10**fit.zero_at], [0], xerr=[[10**fit.zero_at - 10**fit.zero_low],
                    [10**fit.zero_high - 10**fit.zero_at]], color=color, marker="x",
                    capsize=3)  # fmt: skip
    ax.annotate(f"0 at {10**fit.zero_at:.2g} (extrapolated)", (10**fit.zero_at, 0), textcoords="offset points",
                xytext=(0, label_at), fontsize=8, color=color, ha="center")  # fmt: skip
