"""`dem pretrain` and `dem finetune` end to end on a few steps."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from _helpers_train import make_base

from dem.cli import build_parser, main

torch.set_num_threads(1)

FINETUNE = ["--steps", "3", "--batch-size", "4", "--n-train", "16", "--n-validation", "8"]
FINETUNE += ["--max-length", "32", "--eval-every", "2", "--no-progress", "--threads", "1"]


def test_pretrain_then_finetune(tmp_path, capsys):
    base = tmp_path / "base"
    argv = ["pretrain", "--out", str(base), "--steps", "3", "--batch-size", "4"]
    argv += ["--seq-len", "32", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2"]
    assert main([*argv, "--no-progress", "--threads", "1"]) == 0
    assert (base / "model.safetensors").is_file()
    capsys.readouterr()

    out = tmp_path / "ft"
    assert (
        main(
            ["finetune", "--base", str(base), "--source", "word_edit", "--out", str(out), *FINETUNE]
        )
        == 0
    )
    cost = json.loads(capsys.readouterr().out)
    assert cost == json.loads((out / "cost.json").read_text()) and cost["steps"] == 3

    mix = tmp_path / "mix"
    argv = ["finetune", "--base", str(base), "--mixture", "arithmetic=0.5,word_edit=0.5"]
    assert main([*argv, "--out", str(mix), *FINETUNE]) == 0
    record = json.loads((mix / "dem_train.json").read_text())
    assert record["parameters"]["mixture"] == {"arithmetic": 0.5, "word_edit": 0.5}
    assert record["parameters"]["source_kwargs"] == {"n_train": 16, "n_validation": 8}


def test_custom_source_from_a_local_file(tmp_path, capsys):
    base = make_base(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    rows = [{"q": f"double {i}", "a": str(2 * i)} for i in range(200)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"name": "double", "path": str(data), "prompt_template": "{q}", "response_field": "a"}
    out = tmp_path / "ft"
    argv = ["finetune", "--base", str(base), "--source", json.dumps(spec), "--out", str(out)]
    assert main([*argv, *FINETUNE]) == 0
    record = json.loads((out / "dem_train.json").read_text())
    assert record["parameters"]["custom_sources"]["double"]["path"] == str(data)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mixture", "arithmetic=-1,facts=1"], "must be a finite number >= 0"),
        (["--mixture", "arithmetic=0"], "all zero"),
        (["--source", "nosuch"], "unknown source 'nosuch'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    base = make_base(tmp_path / "base")
    capsys.readouterr()  # forget transformers' "Writing model shards" bar
    code = main(["finetune", "--base", str(base), *extra, "--out", str(tmp_path / "o"), *FINETUNE])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("dem finetune: error:")
    assert err.count("\n") == 1  # one line, no traceback


def test_python_dash_m_reports_vocabulary_mismatch(tmp_path):
    from transformers import AutoTokenizer

    base = make_base(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<x>"])
    tokenizer.save_pretrained(base)
    argv = [sys.executable, "-m", "dem", "finetune", "--base", str(base), "--source", "arithmetic"]
    proc = subprocess.run(
        [*argv, "--out", str(tmp_path / "o"), *FINETUNE], capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "tokenizer has 101 tokens but the model's embedding has only 100 rows" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_defaults_match_the_library():
    """The CLI leaves unset options to the library; its help texts must quote the same values."""
    from dataclasses import fields

    from dem.training.settings import FinetuneSettings, PretrainSettings

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    required = {"finetune": ["--base", "b", "--source", "x"]}
    for command, settings in (("pretrain", PretrainSettings), ("finetune", FinetuneSettings)):
        defaults = {f.name: f.default for f in fields(settings)}
        checked = 0
        for action in subparsers[command]._actions:
            match = re.search(r"\(default ([0-9][0-9.e+-]*)\)", action.help or "")
            name = action.dest
            if match and name in defaults and name != "threads":
                assert float(match.group(1)) == defaults[name], (command, name)
                checked += 1
        assert checked >= 5, command
        # Every setting is an option, and every option the user leaves unset is not passed.
        assert set(defaults) <= {a.dest for a in subparsers[command]._actions}, command
        args = parser.parse_args([command, "--out", "o", *required.get(command, [])])
        assert all(getattr(args, name) is None for name in defaults), command
