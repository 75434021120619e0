"""The run folder's layout and the chapters' one setup call (dem.layout, dem.chapters.notebook)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dem import DemError
from dem.chapters.notebook import SETUP_PARAMETERS, cap_new_tokens, dmix_mixtures, setup
from dem.layout import FIGURES, TABLES, RunLayout
from dem.sources import get_source

PARAMS = {
    "run_dir": "runs/x",
    "seed": 3,
    "sources": ["arithmetic", "word_edit"],
    "composite": "composite",
    "n_train": 8,
    "n_validation": 4,
    "n_test": 4,
    "base_model": "",
    "max_new_tokens": 0,
    "device": "cpu",
    "dtype": "auto",
}


def test_layout_keeps_the_documented_names(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.base == tmp_path / "models" / "base"
    assert layout.ft_model("facts") == tmp_path / "models" / "ft" / "facts"
    assert layout.train_log("facts") == tmp_path / "models" / "ft" / "facts" / "train_log.csv"
    assert layout.dmix_model("dmix_1-1") == tmp_path / "models" / "dmix" / "dmix_1-1"
    assert layout.dem_model == tmp_path / "models" / "dem"
    assert layout.dem_merge_record == tmp_path / "models" / "dem" / "dem_merge.json"
    assert layout.vector("facts") == tmp_path / "vectors" / "facts"
    assert layout.metrics == tmp_path / "metrics.json"
    assert layout.manifest == tmp_path / "manifest.json"
    assert layout.executed_notebook("01_a.ipynb") == tmp_path / "notebooks" / "01_a.ipynb"
    assert layout.table("04_dem_trials") == tmp_path / "tables" / "04_dem_trials.csv"
    assert layout.table("04_merge_settings") == tmp_path / "tables" / "04_merge_settings.json"
    assert layout.table("05_dmix") == tmp_path / "tables" / "05_dmix.json"
    assert layout.figure("06_cost_vs_quality") == tmp_path / "figures" / "06_cost_vs_quality.png"
    assert not any(tmp_path.iterdir()), "naming a path must not create it"


def test_every_table_and_figure_is_named_after_its_chapter():
    for name in [*TABLES, *FIGURES]:
        assert name[:2] in {"01", "02", "03", "04", "05", "06"} and name[2] == "_", name
    assert set(TABLES.values()) == {".csv", ".json"}


def test_a_misspelt_table_or_figure_is_refused_by_name(tmp_path):
    layout = RunLayout(tmp_path)
    with pytest.raises(DemError, match="04_dem_trial'.*04_dem_trials"):
        layout.table("04_dem_trial")
    with pytest.raises(DemError, match="unknown figure '01_length'"):
        layout.figure("01_length")


def test_setup_seeds_builds_sources_and_names_the_run(tmp_path, capsys):
    params = {**PARAMS, "run_dir": str(tmp_path / "run"), "unrelated": object()}
    run = setup(params)
    drawn = torch.rand(3)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(3)), "setup seeds torch with `seed`"
    assert run.layout.root == tmp_path / "run"
    assert run.names == ["arithmetic", "word_edit"]
    assert [s.name for s in run.eval_sources] == ["arithmetic", "word_edit", "composite"]
    assert run.eval_sources[: len(run.train_sources)] == run.train_sources
    assert run.source_kwargs == {"seed": 3, "n_train": 8, "n_validation": 4, "n_test": 4}
    assert run.train_sources[0].sizes["train"] == 8 and run.train_sources[0].seed == 3
    assert run.device == torch.device("cpu") and run.threads >= 1
    assert set(run.params) == set(SETUP_PARAMETERS)
    assert "run folder:" in capsys.readouterr().out


def test_setup_names_a_missing_parameter():
    params = {k: v for k, v in PARAMS.items() if k != "n_test"}
    with pytest.raises(DemError, match="n_test"):
        setup(params)


def test_token_cap_copies_the_source_and_zero_means_no_cap():
    source = get_source("arithmetic_cot", n_train=4, n_validation=4, n_test=4)
    budget = source.max_new_tokens
    assert budget > 3
    capped = cap_new_tokens(source, 3)
    assert capped.max_new_tokens == 3 and source.max_new_tokens == budget
    assert cap_new_tokens(source, 0).max_new_tokens == budget
    assert cap_new_tokens(source, budget + 100).max_new_tokens == budget
    run = setup({**PARAMS, "sources": ["arithmetic_cot"], "max_new_tokens": 3})
    assert {s.max_new_tokens for s in run.eval_sources} <= {3}
    assert run.source("arithmetic_cot").max_new_tokens == 3


def test_steps_per_source_overrides_and_refuses_a_misspelt_name():
    run = setup(PARAMS)
    assert run.steps(10, {"arithmetic": 12}) == {"arithmetic": 12, "word_edit": 10}
    assert run.steps(10, {}, ["compare"]) == {"compare": 10}
    with pytest.raises(DemError, match="source_steps.*arithmetc"):
        run.steps(10, {"arithmetc": 5})
    with pytest.raises(DemError, match="source_steps"):
        run.steps(10, {"arithmetic": 0})


def test_custom_sources_are_kept_by_name(tmp_path):
    data = Path(tmp_path / "mine.jsonl")
    data.write_text("".join(f'{{"q": "q{i}", "a": "a{i}"}}\n' for i in range(40)))
    spec = {"name": "mine", "path": str(data), "prompt_template": "{q}", "response_field": "a"}
    run = setup({**PARAMS, "sources": ["arithmetic", spec], "composite": ""})
    assert run.custom_sources == {"mine": spec}
    assert run.names == ["arithmetic", "mine"] and len(run.eval_sources) == 2
    assert run.steps(5, {"mine": 7}) == {"arithmetic": 5, "mine": 7}


def test_dmix_mixtures_label_each_ratio_in_source_order():
    mixtures = dmix_mixtures(["a", "b"], [[1, 1], [2, 1], [0.5, 1]])
    assert mixtures == {
        "dmix_1-1": {"a": 1.0, "b": 1.0},
        "dmix_2-1": {"a": 2.0, "b": 1.0},
        "dmix_0.5-1": {"a": 0.5, "b": 1.0},
    }
    with pytest.raises(DemError, match="2 ratios"):
        dmix_mixtures(["a", "b"], [[1, 1, 1]])
