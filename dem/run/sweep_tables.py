"""The sweep's tables: one row per cell x method (``results.csv``) and the vectors'
diagnostics per cell (``diagnostics.csv``), read from each finished cell's run folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from dem.evaluation.results import write_table


def folder_size(folder: str | Path) -> int:
    """Parameters of a model folder, from its safetensors headers (no tensor is read)."""
    from dem.merging.safetensors_io import read_header

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        header, _ = read_header(path)
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def headline(results: pd.DataFrame, cell_id: str) -> str:
    """``DEM 0.210, DMix uniform 0.422``: the cell's two headline accuracies."""
    rows = results[results.cell == cell_id].set_index("method").accuracy
    return ", ".join(f"{m} {rows[m]:.3f}" for m in ("dem", "dmix_uniform") if m in rows)


# ----------------------------------------------------------------------------------------------
# The tables
# ----------------------------------------------------------------------------------------------


def _device(manifest: dict) -> str:
    """The device a cell trained on, as its manifest records the machine and the setting."""
    hardware, wanted = manifest.get("hardware", {}), manifest["parameters"].get("device", "auto")
    if hardware.get("gpus") and wanted in ("auto", "cuda"):
        return hardware["gpus"][0]
    return f"cpu ({hardware.get('cpu_count')} cores)"


def cell_info(planned, cell_dir: Path) -> dict:
    """The columns that describe a cell, shared by its rows in both tables."""
    manifest = json.loads((cell_dir / "manifest.json").read_text())
    cell = planned.cell
    return {
        "cell": cell.id,
        "base": cell.base.name,
        "params": folder_size(cell_dir / "models" / "base"),
        "budget": cell.budget,
        "kind": cell.kind,
        "seed": cell.seed,
        # a base with its own sources (SmolLM2's real tasks) is compared within its cell only
        "sources": " ".join(manifest["parameters"]["sources"]),
        "device": _device(manifest),
        # the code of the last dem run over the cell (a sweep may span commits)
        "commit": (manifest.get("git", {}).get("commit") or "")[:12],
        "finetune_steps": manifest["parameters"]["finetune_steps"],
        "select_metric": manifest["parameters"].get("select_metric", "accuracy"),
        "cell_wall_s": planned.wall_s,
    }


def cell_rows(planned, cell_dir: Path) -> list[dict]:
    """One row per method of the cell's metrics.json (every method it holds, none named here).

    ``accuracy`` is the mean test accuracy over the cell's sources, as metrics.json's average;
    ``wall_s`` the method's training plus its own weight search; ``search_*`` the search's
    candidates and seconds where chapter 04 records one for the method; ``validation`` the
    objective its chosen weights reached on the selection examples (the first row of its trials
    table, best first), where chapter 04 searched weights for it: the number a choice among the
    variants may use, as test accuracy may not.
    """
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    settings = json.loads((cell_dir / "tables" / "04_merge_settings.json").read_text())
    searches = {"dem": settings["search"], **settings.get("searches", {})}
    info = cell_info(planned, cell_dir)
    rows = []
    for method, entry in metrics["methods"].items():
        search = searches.get(method, {})
        rows.append({
            **info,
            "method": method,
            "accuracy": entry["average"],
            **{f"accuracy_{s}": v for s, v in entry["test"].items()},
            "composite": entry.get("composite"),
            "train_tokens": entry["cost"]["train_tokens"],
            "wall_s": entry["cost"]["wall_s"],
            "forward_passes": entry["cost"].get("forward_passes", 1),
            "search_candidates": search.get("candidates"),
            "search_s": search.get("wall_s"),
            "validation": _selected_objective(cell_dir, method),
        })  # fmt: skip
    return rows


def _selected_objective(cell_dir: Path, method: str) -> float | None:
    """The validation objective of the weights chapter 04 chose for ``method`` (None if it
    searched none): every search there scores its candidates with the same ``score`` on the
    same selection examples, so these numbers compare across methods."""
    path = cell_dir / "tables" / f"04_{method}_trials.csv"
    if not path.is_file():
        return None
    return float(pd.read_csv(path, nrows=1)["objective"].iloc[0])


def cell_diagnostics(planned, cell_dir: Path) -> list[dict]:
    """The cell's vectors (chapter 03): ‖v_i‖/‖θ0‖ per source, cosine and merge gap per pair."""
    metrics = json.loads((cell_dir / "metrics.json").read_text())
    info = cell_info(planned, cell_dir)
    vectors = metrics.get("vectors") or {}
    found = [("relative_norm", k, v) for k, v in (vectors.get("relative_norm") or {}).items()]
    cosine = pd.read_csv(cell_dir / "tables" / "03_cosine_similarity.csv", index_col=0)
    names = list(cosine.index)
    found += [("cosine", f"{a} → {b}", cosine.loc[a, b])
              for i, a in enumerate(names) for b in names[i + 1:]]  # fmt: skip
    found += [("merge_gap", k, v) for k, v in (vectors.get("merge_gap") or {}).items()]
    return [{**info, "quantity": q, "item": item, "value": float(v)} for q, item, v in found]


def write_tables(out: Path, plan: list, order: list[str]) -> pd.DataFrame:
    """``results.csv`` and ``diagnostics.csv`` over the finished cells, in the file's cell order
    (so a rerun writes identical tables); the results table."""
    rank = {cell_id: i for i, cell_id in enumerate(order)}
    finished = sorted((p for p in plan if p.done), key=lambda p: rank[p.cell.id])
    results, diagnostics = [], []
    for p in finished:
        cell_dir = out / "cells" / p.cell.id
        results += cell_rows(p, cell_dir)
        diagnostics += cell_diagnostics(p, cell_dir)
    results_table = pd.DataFrame(results)
    write_table(results_table, out / "results.csv", index=False)
    write_table(pd.DataFrame(diagnostics), out / "diagnostics.csv", index=False)
    return results_table
