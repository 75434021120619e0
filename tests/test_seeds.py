"""dem seeds: the aggregate over seed runs is the plain mean and standard deviation."""

from __future__ import annotations

import json

import pytest

from dem import DemError
from dem.cli import main
from dem.run.seeds import as_markdown, collect, summarize, write_summary


def _run(folder, seed, dem_a, dem_b):
    folder.mkdir(parents=True)
    entry = {"test": {"a": dem_a, "b": dem_b}, "average": (dem_a + dem_b) / 2, "composite": 0.5,
             "cost": {"train_tokens": 100, "wall_s": 1.0}}  # fmt: skip
    metrics = {"sources": ["a", "b"], "composite_source": "c", "methods": {"dem": entry},
               "vectors": {"relative_norm": {"a": 0.01 * (seed + 1)}, "barrier": None}}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path):
    runs = [
        _run(tmp_path / f"seed-{s}", s, a, b)
        for s, (a, b) in enumerate([(0.5, 0.7), (0.7, 0.9), (0.9, 0.8)])
    ]
    summary = summarize(collect(runs)).set_index(["method", "column"])
    assert summary.loc[("dem", "a"), "mean"] == pytest.approx(0.7)
    assert summary.loc[("dem", "a"), "std"] == pytest.approx(0.2)  # ddof=1
    assert summary.loc[("dem", "average"), "mean"] == pytest.approx(0.75)
    assert summary.loc[("dem", "c"), "std"] == 0 and summary.loc[("dem", "c"), "n"] == 3
    assert summary.loc[("‖v‖/‖θ0‖", "a"), "mean"] == pytest.approx(0.02)
    table = as_markdown(summarize(collect(runs)))
    assert "| dem | 0.700 ± 0.200 | 0.800 ± 0.100 | 0.750 ± 0.132 | 0.500 ± 0.000 | 100 |" in table
    write_summary(runs, tmp_path)
    assert (
        (tmp_path / "summary.md").read_text().startswith("Mean ± standard deviation over 3 seeds")
    )


def test_an_unfinished_run_is_named(tmp_path, capsys):
    (tmp_path / "seed-0").mkdir()
    with pytest.raises(DemError, match="seed-0/metrics.json not found"):
        collect([tmp_path / "seed-0"])
    assert main(["seeds", "--out", str(tmp_path), "--seeds", "1", "1"]) == 2
    assert "seeds must be distinct" in capsys.readouterr().err
