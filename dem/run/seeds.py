"""Several seeds of the whole pipeline, and their mean ± standard deviation.

One seed of a small experiment is an anecdote: a different initialisation, data order or split
can move a method by several points. ``dem seeds`` runs ``dem run`` once per seed into
``OUT/seed-N`` (each an ordinary run folder, so an interrupted series resumes where it
stopped) and aggregates the runs' ``metrics.json`` into ``OUT/summary.csv`` and
``OUT/summary.md``: per method, the mean and sample standard deviation over seeds of every
source's test score, the average, the composite set and the training cost.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dem import DemError
from dem.chapters.connectivity import merge_gaps
from dem.io import refuse_foreign_folder, write_text

# Rows of the summary that describe the vectors, not a method's scores (chapter 03).
DIAGNOSTICS = ("‖v‖/‖θ0‖", "merge gap (nats)")


def run_seeds(
    params_file: str | Path | None, out: str | Path, seeds: Sequence[int], *, log=print
) -> pd.DataFrame:
    """Run the pipeline once per seed (skipping finished steps) and aggregate."""
    from dem.run import pipeline

    out = Path(out)
    if len(set(seeds)) != len(seeds):
        raise DemError(f"seeds must be distinct, got {list(seeds)}")
    refuse_foreign_folder(out, _ours, "a dem seeds folder (seed-N, summary.csv, summary.md)")
    for seed in seeds:
        log(f"[dem seeds] seed {seed}")
        pipeline.run(params_file, out / f"seed-{seed}", overrides={"seed": seed}, log=log)
    return write_summary([out / f"seed-{seed}" for seed in seeds], out)


def _ours(name: str) -> bool:
    return re.fullmatch(r"seed-\d+|summary\.(csv|md)", name) is not None


def collect(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per (seed run, method, score): the long table the summary is computed from."""
    rows = []
    for run_dir in map(Path, run_dirs):
        path = run_dir / "metrics.json"
        if not path.is_file():
            raise DemError(f"{path} not found: did the run in {run_dir} finish?")
        metrics = json.loads(path.read_text())
        for method, entry in metrics["methods"].items():
            scores = {**entry["test"], "average": entry["average"]}
            if entry.get("composite") is not None:
                scores[metrics["composite_source"]] = entry["composite"]
            scores["train_tokens"] = entry["cost"]["train_tokens"]
            rows += [
                {"run": run_dir.name, "method": method, "column": k, "value": float(v)}
                for k, v in scores.items()
            ]
        for source, ratio in (metrics.get("vectors") or {}).get("relative_norm", {}).items():
            rows.append(
                {"run": run_dir.name, "method": DIAGNOSTICS[0], "column": source, "value": ratio}
            )
        tables = run_dir / "tables"
        straight, between = tables / "03_straight_path.csv", tables / "03_between_fine_tunes.csv"
        if straight.is_file() and between.is_file():
            gaps = merge_gaps(pd.read_csv(straight), pd.read_csv(between))
            rows += [
                {"run": run_dir.name, "method": DIAGNOSTICS[1], "column": r.pair, "value": r.gap}
                for r in gaps.itertuples()
            ]
    return pd.DataFrame(rows)


def summarize(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1) and count over runs, per method and column."""
    grouped = long.groupby(["method", "column"], sort=False)["value"]
    table = grouped.agg(mean="mean", std="std", n="count").reset_index()
    return table


def as_markdown(summary: pd.DataFrame, digits: int = 3) -> str:
    """Methods × columns, each cell ``mean ± std`` (tokens as integers); then the diagnostics."""
    diagnostics = summary.method.isin(DIAGNOSTICS)
    text = _table(summary[~diagnostics], digits)
    for name in DIAGNOSTICS:
        part = summary[summary.method == name]
        if len(part):
            text += f"\n{name}:\n\n" + _table(part, digits)
    return text


def _table(summary: pd.DataFrame, digits: int) -> str:
    def cell(row) -> str:
        if row.column == "train_tokens":
            return f"{row['mean']:,.0f}"
        std = "" if pd.isna(row["std"]) else f" ± {row['std']:.{digits}f}"
        return f"{row['mean']:.{digits}f}{std}"

    wide = summary.assign(cell=summary.apply(cell, axis=1)).pivot(
        index="method", columns="column", values="cell"
    )
    methods = list(dict.fromkeys(summary.method))
    columns = list(dict.fromkeys(summary.column))
    wide = wide.loc[methods, columns].fillna("")
    header = "| method | " + " | ".join(columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [header, rule] + [
        f"| {m} | " + " | ".join(wide.loc[m, c] for c in columns) + " |" for m in methods
    ]
    return "\n".join(lines) + "\n"


def write_summary(run_dirs: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Aggregate finished runs into ``out/summary.csv`` and ``out/summary.md``."""
    out = Path(out)
    summary = summarize(collect(run_dirs))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "summary.csv", summary.to_csv(index=False))
    n = summary.n.max()
    write_text(
        out / "summary.md",
        f"Mean ± standard deviation over {n} seeds ({', '.join(Path(d).name for d in run_dirs)}); "
        "test accuracy, train_tokens per method.\n\n" + as_markdown(summary),
    )
    return summary
