"""One declaration of every run setting (dem/config.py): the chapters' parameters cells, the
parameter files, the command line and a chapter's own checks all come from it."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys

import papermill as pm
import pytest
import yaml

from dem import DemError
from dem.chapters.notebook import resolve_run_dir, setup
from dem.cli import main
from dem.config import ALL, RunConfig, make_config
from dem.config_files import load_config, parameters_cell
from dem.resources import run_parameter_sets
from dem.run.pipeline import NOTEBOOKS, PARAMS, notebooks

CHAPTERS = [nb for nb in notebooks() if nb.name[:2] in ALL]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapters_parameters_cell_is_the_declaration(path):
    declared = pm.inspect_notebook(str(path))
    chapter = path.name[:2]
    default = RunConfig()
    assert list(declared) == RunConfig.names(chapter)
    for name, spec in declared.items():
        assert ast.literal_eval(spec["default"]) == getattr(default, name), name
    cell = next(c for c in json.loads(path.read_text())["cells"]
                if "parameters" in c["metadata"].get("tags", []))  # fmt: skip
    assert "".join(cell["source"]) == parameters_cell(chapter), "python -m dem.config_files"


def test_the_default_parameter_set_changes_nothing_and_the_others_list_only_changes():
    assert load_config(PARAMS / "default.yaml") == RunConfig()
    for path in run_parameter_sets():
        given = yaml.safe_load(path.read_text()) or {}
        config = load_config(path)
        same = [k for k, v in given.items() if make_config({k: v}) == RunConfig()]
        assert not same, f"{path.name} repeats defaults {same}"
        assert config.changes() == {k: getattr(config, k) for k in given}


def test_the_package_defaults_are_the_embedded_default():
    from dem.training.settings import FinetuneSettings

    config, settings = RunConfig(), FinetuneSettings()
    assert settings.steps == config.finetune_steps
    # lr and lora_r are left to the base: a tiny base gets the tutorial's, a real LM its own
    tiny, real = settings.for_base(large=False), settings.for_base(large=True)
    assert (tiny.lr, tiny.lora_r) == (config.learning_rate, config.lora_r)
    assert (real.lr, real.lora_r) == (1e-3, 8)
    assert settings.updated(lora_r=0).for_base(large=True).lr == 2e-5
    assert settings.updated(lr=5e-4).for_base(large=True).lr == 5e-4  # what the user set stays
    assert settings.dtype == config.dtype == "auto"
    assert settings.batch_size == config.batch_size
    assert settings.warmup_steps == config.warmup_steps
    assert settings.eval_every == config.eval_every and settings.max_length == config.max_length


@pytest.mark.parametrize(
    "text, expected",
    [
        ("finetune_step: 400\n", "unknown setting 'finetune_step' (did you mean finetune_steps?)"),
        ("finetune_steps: '400'\n", "finetune_steps must be an integer, got '400'"),
        ("learning_rate: 1e-3\n", "YAML reads 1e-3 as text"),
        ("search_strategy: gradient\n", "search_strategy must be one of grid, random"),
        ("select_metric: f1\n", "select_metric must be one of accuracy, loss"),
        ("dare_drop_prob: 1.0\n", "dare_drop_prob must be a number in [0, 1)"),
        ("more_merges: [ties2]\n", "more_merges must be one of"),
        ("sources: arithmetic\n", "sources must be a list of"),
        ("n_test: 0\n", "n_test must be a number >= 1"),
        ("run_dir: here\n", "run_dir is set by dem run itself"),
        ("- seed\n", "expected a mapping of setting: value, got list"),
        ("seed: [1\n", "not valid YAML"),
    ],
)
def test_a_bad_parameter_file_is_refused_in_one_line_naming_file_and_key(
    tmp_path, capsys, text, expected
):
    params = tmp_path / "bad.yaml"
    params.write_text(text)
    with pytest.raises(DemError, match=r"bad\.yaml") as err:
        load_config(params)
    assert expected in str(err.value)
    out = tmp_path / "run"
    assert main(["run", "--params", str(params), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert not out.exists(), "nothing is written for a refused parameter file"


def test_set_overrides_one_setting_checked_like_the_file(capsys):
    assert main(["config", "--params", "smoke", "--set", "finetune_steps=30"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["settings"]["finetune_steps"] == 30 and shown["changes"]["n_train"] == 64
    assert main(["config", "--set", "search_strategy=gradient"]) == 2
    assert "search_strategy must be one of" in capsys.readouterr().err
    assert main(["config", "--set", "finetune_steps"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_dem_config_lists_every_setting_with_its_why(capsys):
    assert main(["config"]) == 0
    shown = capsys.readouterr().out
    assert all(f"\n{name} = " in "\n" + shown for name in RunConfig.names())


def test_a_relative_run_folder_is_the_projects_from_jupyter_and_from_the_project(tmp_path):
    (tmp_path / "notebooks" / "params").mkdir(parents=True)
    here = os.getcwd()
    try:
        os.chdir(tmp_path / "notebooks")  # where JupyterLab starts a chapter's kernel
        assert resolve_run_dir("runs/default") == tmp_path / "runs" / "default"
        os.chdir(tmp_path)  # where `dem run` is started
        assert resolve_run_dir("runs/default") == tmp_path / "runs" / "default"
    finally:
        os.chdir(here)
    assert resolve_run_dir(tmp_path / "x") == tmp_path / "x"


def _chapter_params(tmp_path, chapter, **changes):
    return {**RunConfig().to_dict(chapter), "run_dir": str(tmp_path / "run"), **changes}


def test_a_chapter_stops_naming_the_chapter_to_run_first(tmp_path):
    with pytest.raises(DemError, match=r"chapter 03 needs 01_data_sources\.ipynb finished"):
        setup(_chapter_params(tmp_path, "03"), chapter="03")
    for chapter in ("01", "02"):
        setup(_chapter_params(tmp_path, chapter), chapter=chapter).finish()
    setup(_chapter_params(tmp_path, "03"), chapter="03")  # 01 and 02 finished: no error
    with pytest.raises(DemError, match=r"chapter 04 needs 03_distribution_vectors"):
        setup(_chapter_params(tmp_path, "04"), chapter="04")


def test_a_chapter_refuses_settings_that_differ_from_an_earlier_chapters(tmp_path):
    for chapter in ("01", "02"):
        setup(_chapter_params(tmp_path, chapter), chapter=chapter).finish()
    with pytest.raises(DemError, match=r"02_finetuning\.ipynb ran in .* with finetune_steps=200"):
        setup(_chapter_params(tmp_path, "05", finetune_steps=400), chapter="05")
    with pytest.raises(DemError, match="chapter 05's parameters: select_metric must be one of"):
        setup(_chapter_params(tmp_path, "05", select_metric="f1"), chapter="05")


def test_a_chapters_error_shows_as_one_line_in_jupyter():
    assert DemError("chapter 03 needs 02 first")._render_traceback_() == [
        "DemError: chapter 03 needs 02 first"
    ]


@pytest.mark.slow
def test_every_chapter_runs_as_is_with_no_parameters_like_dem_run(tmp_path):
    """Run All in JupyterLab, chapter after chapter, on a fresh copy: the same metrics as
    `dem run` gives for the default (both ~15 min on 2 cores; `pytest -m slow`)."""
    project = tmp_path / "project"
    shutil.copytree(NOTEBOOKS, project / "notebooks")
    for path in CHAPTERS:
        pm.execute_notebook(str(project / "notebooks" / path.name), str(tmp_path / path.name),
                            cwd=str(project / "notebooks"), progress_bar=False)  # fmt: skip
    by_hand = json.loads((project / "runs" / "default" / "metrics.json").read_text())
    done = subprocess.run([sys.executable, "-m", "dem", "run", "--quiet", "--out",
                           str(tmp_path / "dem-run")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert _scores(json.loads((tmp_path / "dem-run" / "metrics.json").read_text())) == _scores(
        by_hand
    )


def _scores(metrics):
    """metrics.json without its wall times (seconds differ between any two runs)."""
    if isinstance(metrics, dict):
        return {k: _scores(v) for k, v in metrics.items() if k != "wall_s"}
    return metrics
