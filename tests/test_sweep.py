"""dem sweep and chapter 07: the sweep file's checks, the cell selection and plan, the gap
analysis against known answers, and the smoke sweep end to end through the command line."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml

from dem import DemError
from dem.chapters import scale
from dem.cli import main
from dem.run import sweep

BASES = [
    {"name": "a", "base_model": "dem:tiny-knowledge-h64"},
    {"name": "b", "base_model": "dem:tiny-knowledge-h128"},
    {"name": "c", "base_model": "dem:tiny-knowledge"},
]


def _file(tmp_path, **settings):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"params": "smoke", "bases": BASES, **settings}))
    return path


# ---- the sweep file -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"budget": [1]}, "unknown key 'budget'"),
        ({"seeds": [0, "1"]}, "seeds[1]: expected int, got '1'"),
        ({"budgets": 4}, "budgets: expected list, got 4"),
        ({"order": "fast"}, "order: expected one of curve, file, got 'fast'"),
        ({"kinds": {"lora": {"lora_rr": 8}}}, "cell a-x1-lora-s0: unknown setting 'lora_rr'"),
        ({"cells": [{"bases": ["z"]}]}, "cells: bases ['z'] not declared"),
        ({"cells": [{"kind": ["full"]}]}, "cells[0]: unknown key 'kind'"),
        ({"bases": [{"name": "a"}]}, "bases[0]: missing key 'base_model'"),
        ({"bases": [{"name": "a", "base_model": "dem:nope"}]}, "bases: a: no shipped base"),
    ],
)
def test_bad_sweep_file_is_one_line_naming_file_and_key(tmp_path, settings, message):
    path = _file(tmp_path, **settings)
    with pytest.raises(DemError) as err:
        sweep.make_plan(sweep.load_sweep(path), tmp_path / "out", f"sweep file {path}")
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_shipped_sweeps_load_and_every_cell_is_valid(tmp_path):
    for name in ("sweep", "sweep-smoke"):
        config = sweep.load_sweep(name)
        plan = sweep.make_plan(config, tmp_path / "no-such-folder", name)
        assert plan and not any(p.done for p in plan)


# ---- cells and the plan -------------------------------------------------------------------


def test_cells_are_the_union_of_blocks_not_the_cross_product(tmp_path):
    config = sweep.load_sweep(_file(
        tmp_path, budgets=[1, 4], kinds={"full": {}, "lora": {"lora_r": 8}}, seeds=[0, 1, 2],
        cells=[{"budgets": [1], "kinds": ["full"]},  # every base, every seed
               {"bases": ["a", "c"], "budgets": [4], "kinds": ["full"], "seeds": [0]},
               {"bases": ["a"], "budgets": [1], "kinds": ["full"], "seeds": [0]}],  # already in
    ))  # fmt: skip
    ids = [c.id for c in sweep.select_cells(config)]
    assert len(ids) == len(set(ids)) == 3 * 3 + 2
    assert "c-x4-full-s0" in ids and "b-x4-full-s0" not in ids and not any("lora" in i for i in ids)
    everything = sweep.load_sweep(_file(tmp_path, budgets=[1, 4], seeds=[0, 1]))
    assert len(sweep.select_cells(everything)) == 3 * 2 * 1 * 2  # no cells: the whole grid


def test_budget_multiplies_every_per_source_step_count_and_kind_adds_its_settings(tmp_path):
    config = sweep.load_sweep(_file(tmp_path, budgets=[1, 4], kinds={"lora": {"lora_r": 4}},
                                    overrides={"swap_out": ""}))  # fmt: skip
    cell = sweep.Cell(config.bases[0], 4, "lora", 2)
    _, overrides, settings = sweep.cell_overrides(config, cell, "here")
    # smoke.yaml: finetune_steps 10, source_steps {arithmetic: 12}, four sources, three DMix runs
    assert overrides["finetune_steps"] == 40 and overrides["source_steps"] == {"arithmetic": 48}
    assert overrides["lora_r"] == 4 and overrides["seed"] == 2 and overrides["swap_out"] == ""
    assert overrides["base_model"] == "dem:tiny-knowledge-h64"
    assert sweep.training_steps(settings) == (48 + 3 * 40) * (1 + 3)


def test_curve_order_runs_the_main_axis_seed_by_seed_cheapest_first(tmp_path):
    config = sweep.load_sweep(_file(tmp_path, budgets=[1, 4], seeds=[0, 1]))
    plan = sweep.make_plan(config, tmp_path / "out", "here")
    ids = [p.cell.id for p in plan]
    assert ids[:6] == ["a-x1-full-s0", "b-x1-full-s0", "c-x1-full-s0",
                       "a-x1-full-s1", "b-x1-full-s1", "c-x1-full-s1"]  # fmt: skip
    assert [p.size for p in plan[:3]] == [170_816, 669_312, 2_649_344]
    as_listed = sweep.load_sweep(_file(tmp_path, budgets=[1, 4], seeds=[0, 1], order="file"))
    assert [p.cell.id for p in sweep.make_plan(as_listed, tmp_path, "here")][:2] == [
        "a-x1-full-s0", "a-x1-full-s1"]  # fmt: skip


def test_plan_calibrates_estimates_on_finished_cells(tmp_path):
    config = sweep.load_sweep(_file(tmp_path))
    out = tmp_path / "out"
    prior = {p.cell.id: p for p in sweep.make_plan(config, out, "here")}
    done = prior["a-x1-full-s0"]
    folder = out / "cells" / done.cell.id
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    (folder / sweep.DONE).write_text(json.dumps(
        {"overrides": done.overrides, "wall_s": 3 * done.estimate_s}))  # fmt: skip
    after = {p.cell.id: p for p in sweep.make_plan(config, out, "here")}
    assert after[done.cell.id].done and after[done.cell.id].wall_s == 3 * done.estimate_s
    assert after["c-x1-full-s0"].estimate_s == pytest.approx(3 * prior["c-x1-full-s0"].estimate_s)
    assert "1 finished" in sweep.plan_text(list(after.values()))
    # two finished cells of different cost: the line through them, fixed part included
    plan = sweep.make_plan(config, tmp_path / "none", "here")
    for p in plan[:2]:
        p.done, p.wall_s = True, 100 + 2 * p.estimate_s
    expected = 100 + 2 * plan[2].estimate_s
    sweep.calibrate(plan)
    assert plan[2].estimate_s == pytest.approx(expected)
    with pytest.raises(DemError, match="matches no cell"):
        sweep.pick(list(after.values()), ["z-*"])
    assert [p.cell.id for p in sweep.pick(list(after.values()), ["b-*"])] == ["b-x1-full-s0"]


# ---- the analysis (chapter 07) ------------------------------------------------------------


def _results(slope, noise, seeds=3, seed=0):
    """A results table whose DMix−DEM gap is 0.3 + slope·log10(params/1e5) plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for base, params in [("a", 1e5), ("b", 1e6), ("c", 1e7)]:
        for s in range(seeds):
            gap = 0.3 + slope * np.log10(params / 1e5) + rng.normal(0, noise)
            cell = dict(cell=f"{base}-s{s}", base=base, params=params, budget=1, kind="full",
                        seed=s, select_metric="accuracy")  # fmt: skip
            # (method, test accuracy, validation score of its chosen weights)
            for method, acc, val in [("dem", 0.2, 0.30), ("dem_new_search", 0.25, 0.31),
                                     ("dem_lucky_on_test", 0.6, 0.05), ("mde", 0.9, 0.9),
                                     ("dmix_dem_guided", 0.95, None),
                                     ("dmix_uniform", 0.2 + gap, None)]:  # fmt: skip
                rows.append({**cell, "method": method, "accuracy": acc, "validation": val})
    return pd.DataFrame(rows)


def _grid(fit_table):
    return fit_table[fit_table.gap == scale.GRID].iloc[0]


def test_gap_counts_every_dem_variant_by_name_and_nothing_else():
    gaps = scale.gaps(_results(-0.1, 0.0))
    best = gaps[gaps.gap == scale.BEST]
    # chosen on validation: not the variant best on test, not mde, not a DMix run named after DEM
    assert set(best.variant) == {"dem_new_search"}
    grid = gaps[gaps.gap == scale.GRID].set_index("base").value
    assert grid["a"].tolist() == pytest.approx([0.3] * 3)
    assert best.value.to_numpy() == pytest.approx(grid.to_numpy() - 0.05)


def test_best_variant_follows_the_selection_metric_direction():
    results = _results(-0.1, 0.0)
    losses = results.assign(select_metric="loss")  # a lower validation loss is better
    best = scale.gaps(losses)
    assert set(best[best.gap == scale.BEST].variant) == {"dem_lucky_on_test"}
    with pytest.raises(DemError, match="no DEM variant with a validation score"):
        scale.gaps(results.assign(validation=None))


def test_mixing_and_method_tables_hold_every_method_and_cost():
    results = _results(-0.1, 0.0).assign(train_tokens=100)
    mixing = scale.guided_mixing(results)
    assert list(mixing.base) == ["a", "b", "c"]
    assert mixing.dmix_dem_guided_accuracy.to_numpy() == pytest.approx([0.95] * 3)
    assert (mixing.dmix_uniform_seeds == 3).all()
    means = scale.method_means(results)
    assert list(means.index) == list(dict.fromkeys(results.method))
    assert list(means.columns) == ["a 1×S full", "b 1×S full", "c 1×S full"]


def test_fit_recovers_the_slope_and_the_zero_crossing_with_intervals():
    gaps = scale.gaps(_results(-0.1, 0.01))
    fit = _grid(scale.fits(gaps))
    assert fit.b == pytest.approx(-0.1, abs=0.02) and fit.b_low < -0.1 < fit.b_high < 0
    # 0.3 - 0.1·(x - 5) = 0 at x = 8: 100M parameters, beyond the largest base (10M)
    assert fit.zero_at == pytest.approx(8, abs=0.4) and fit.extrapolated
    assert fit.zero_low < fit.zero_at < fit.zero_high
    words = scale.verdict(fit)
    assert "shrinks" in words and "extrapolation" in words


def test_no_trend_when_the_interval_includes_zero_and_no_claim_from_one_seed():
    flat = _grid(scale.fits(scale.gaps(_results(0.0, 0.05))))
    assert flat.b_low < 0 < flat.b_high
    assert "no trend is measured" in scale.verdict(flat)
    single = _grid(scale.fits(scale.gaps(_results(-0.1, 0.05, seeds=1))))
    assert np.isnan(single.b_low)
    assert "no claim of a trend" in scale.verdict(single)
    # two seeds at one base only: the other bases would count as exact, so still no interval
    mixed = scale.gaps(_results(-0.1, 0.05))
    mixed = mixed[(mixed.base == "a") | (mixed.seed == 0)]
    assert np.isnan(_grid(scale.fits(mixed)).b_low)


def test_bootstrap_keeps_every_base_and_is_seeded():
    points = scale.gaps(_results(-0.1, 0.02))
    points = points[points.gap == scale.GRID].assign(x=lambda t: np.log10(t.params))
    one, two = (scale.bootstrap_lines(points, 50, seed=3) for _ in range(2))
    assert np.array_equal(one, two) and np.isfinite(one).all()


# ---- chapter 07 is a thin, clean notebook ------------------------------------------------


def test_chapter_07_is_clean_thin_and_documented():
    nb = nbformat.read(sweep.CHAPTER, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].source.startswith("# 07 ")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not cell.outputs and cell.execution_count is None
        defined = [n for n in ast.walk(ast.parse(cell.source))
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))]  # fmt: skip
        assert not defined and len(cell.source.strip().splitlines()) <= 12
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "## Summary" in markdown and "## Exercises" in markdown


def test_dem_run_does_not_execute_chapter_07():
    from dem.run.pipeline import notebooks

    assert sweep.CHAPTER.stem not in [nb.stem for nb in notebooks()]


# ---- the smoke sweep, end to end ----------------------------------------------------------


def _dem(*args):
    cmd = [sys.executable, "-m", "dem", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                          "MPLBACKEND": "agg"})  # fmt: skip


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """The smoke sweep run once, uninterrupted: its folder and the command's result."""
    out = tmp_path_factory.mktemp("smoke") / "sweep"
    return out, _dem("sweep", "--params", "sweep-smoke", "--out", out)


def test_smoke_sweep_fills_the_tables_resumes_and_publishes(smoke_sweep, tmp_path):
    out, first = smoke_sweep
    assert first.returncode == 0, first.stderr[-2000:]
    results = pd.read_csv(out / "results.csv")
    cells = sorted(p.name for p in (out / "cells").iterdir())
    assert cells == ["h128-x1-full-s0", "h64-x1-full-s0"]
    for cell in cells:
        metrics = json.loads((out / "cells" / cell / "metrics.json").read_text())
        rows = results[results.cell == cell].set_index("method")
        assert list(rows.index) == list(metrics["methods"])  # one row per method, every method
        assert rows.loc["dem", "accuracy"] == pytest.approx(metrics["methods"]["dem"]["average"])
        for source, value in metrics["methods"]["dem"]["test"].items():
            assert rows.loc["dem", f"accuracy_{source}"] == pytest.approx(value)
    assert results.accuracy.between(0, 1).all() and (results.params > 0).all()
    for column in ["base", "params", "budget", "kind", "seed", "device", "method",
                   "train_tokens", "cell_wall_s", "search_candidates", "search_s"]:  # fmt: skip
        assert column in results
    assert results.loc[results.method == "dem", "search_candidates"].gt(0).all()
    # every DEM variant's chosen weights carry their validation score, the others none
    variants = results[results.method.str.match(scale.DEM_VARIANTS)]
    assert variants.validation.notna().all() and variants.validation.between(0, 1).all()
    assert results[results.method.str.startswith("dmix")].validation.isna().all()
    diagnostics = pd.read_csv(out / "diagnostics.csv")
    assert set(diagnostics.quantity) == {"relative_norm", "cosine", "merge_gap"}
    assert (out / "figures" / "07_gap_vs_params.png").stat().st_size > 0
    tables = (out / "results.csv").read_bytes(), (out / "diagnostics.csv").read_bytes()

    again = _dem("sweep", "--params", "sweep-smoke", "--out", out, "--no-chapter")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("finished earlier, skipped") == 2 and "running" not in again.stdout
    assert ((out / "results.csv").read_bytes(), (out / "diagnostics.csv").read_bytes()) == tables
    assert main(["publish", str(out), "--out", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "07_when_dem_works.md").is_file()
    assert (tmp_path / "docs" / "results.csv").read_bytes() == tables[0]
    # --refresh passes finished cells through dem run, which finds every chapter unchanged
    refreshed = _dem("sweep", "--params", "sweep-smoke", "--out", out, "--no-chapter", "--refresh")
    assert refreshed.returncode == 0 and refreshed.stdout.count("running") == 2
    # the same numbers; only the commit column may move (the last dem run's commit)
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv").drop(columns="commit"),
                                  results.drop(columns="commit"))  # fmt: skip
    log = (out / "logs" / "h64-x1-full-s0.log").read_text()
    assert log.count("unchanged, skipped") == 6


def test_cli_refuses_a_bad_sweep_file_in_one_line_and_writes_nothing(tmp_path):
    path = _file(tmp_path, seeds=["zero"])
    result = _dem("sweep", "--params", path, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "seeds[0]: expected int" in result.stderr
    assert not (tmp_path / "out").exists()
    plan = _dem("sweep", "--params", "sweep-smoke", "--out", tmp_path / "out", "--plan")
    assert plan.returncode == 0 and "h64-x1-full-s0" in plan.stdout
    assert not (tmp_path / "out").exists()


def _compare_runs():
    """benchmarks/compare_runs.py: two run folders equal number by number, wall times aside."""
    path = Path(__file__).parents[1] / "benchmarks" / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compare


@pytest.mark.slow
def test_a_sweep_killed_mid_chapter_resumes_to_the_same_numbers(smoke_sweep, tmp_path):
    """SIGKILL to dem sweep and its kernels inside the first cell's chapter 04 (its dem run
    killed mid-chapter, the sweep mid-cell), then the same command: every cell's metrics.json
    and tables equal the uninterrupted sweep's."""
    import psutil

    reference, first = smoke_sweep
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "dem", "sweep", "--params", "sweep-smoke", "--out", str(out),
               "--no-chapter"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    chapters = out / "cells" / "h64-x1-full-s0" / "chapters"
    deadline = time.monotonic() + 600
    while not (chapters / "03.json").exists() and time.monotonic() < deadline:
        assert process.poll() is None, "the sweep ended before its first cell reached chapter 04"
        time.sleep(0.05)
    time.sleep(2)  # into chapter 04's weight search
    parent = psutil.Process(process.pid)
    family = [*parent.children(recursive=True), parent]
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=30)
    assert (chapters / "03.json").exists() and not (chapters / "04.json").exists()
    again = _dem("sweep", "--params", "sweep-smoke", "--out", out, "--no-chapter")
    assert again.returncode == 0, again.stderr[-2000:]
    compare = _compare_runs()
    for cell in ("h64-x1-full-s0", "h128-x1-full-s0"):
        assert compare(reference / "cells" / cell, out / "cells" / cell) == [], cell
