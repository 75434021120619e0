"""Evaluate model folders and assemble the results table and ``metrics.json`` of a run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from dem import DemError


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
    from dem.evaluate import evaluate
    from dem.models import load_model

    tables = []
    for name, folder in folders.items():
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
) -> dict:
    """One method's record in ``metrics.json``: test scores, their average, composite, cost."""
    missing = [s for s in sources if s not in test]
    if missing:
        raise DemError(f"no test score for source(s) {missing}")
    scores = {s: float(test[s]) for s in sources}
    return {
        "test": scores,
        "average": sum(scores.values()) / len(scores),
        "composite": None if composite is None else float(composite),
        "cost": {"train_tokens": int(train_tokens), "wall_s": round(float(wall_s), 2)},
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
