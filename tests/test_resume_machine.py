"""Resuming on another machine is refused unless asked for (--allow-mix).

A run records the torch version, device, dtype and thread count it started with; a resumed
fine-tune or a rerun of ``dem run`` that would reuse finished chapters compares them with this
machine's. A different machine is simulated by editing the record.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers_train import make_base, same_weights
from test_pipeline import _notebook

from dem import DemError
from dem.cli import main
from dem.run.pipeline import run
from dem.training import finetune as finetune_module

torch.set_num_threads(1)

ARGS = ["--source", "arithmetic", "--steps", "6", "--eval-every", "2", "--batch-size", "4",
        "--n-train", "16", "--n-validation", "8", "--max-length", "32", "--no-progress",
        "--threads", "1"]  # fmt: skip


def _other_machine(record_file: Path, **changes) -> dict:
    record = json.loads(record_file.read_text())
    old = dict(record["machine"])
    record["machine"].update(changes)
    record_file.write_text(json.dumps(record))
    return old


def test_a_fine_tune_resumes_on_another_machine_only_with_allow_mix(tmp_path, capsys, monkeypatch):
    base = make_base(tmp_path / "base")
    assert main(["finetune", "--base", str(base), "--out", str(tmp_path / "whole"), *ARGS]) == 0
    out = tmp_path / "run"
    argv = ["finetune", "--base", str(base), "--out", str(out), *ARGS]
    loop = finetune_module.train_loop

    def crash(step: int, row: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt  # Ctrl-C after the checkpoint of step 2

    monkeypatch.setattr(
        finetune_module, "train_loop", lambda *a, **k: loop(*a, **{**k, "callback": crash})
    )
    assert main(argv) == 130
    monkeypatch.undo()
    partial = tmp_path / "run.partial"
    assert (partial / "checkpoint").is_dir()
    here = _other_machine(partial / "dem_train.json", torch="1.0.0", threads=7)
    assert here["torch"] == torch.__version__ and here["threads"] == 1
    assert here["device"] == "cpu" and here["dtype"] == "float32"
    capsys.readouterr()

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"torch 1.0.0 (now {torch.__version__})" in err and "threads 7 (now 1)" in err
    assert "--allow-mix" in err and str(partial) in err
    assert (partial / "checkpoint").is_dir() and not out.exists()  # nothing lost

    assert main([*argv, "--allow-mix"]) == 0
    record = json.loads((out / "dem_train.json").read_text())
    assert record["resumed_from_machine"]["torch"] == "1.0.0"
    assert record["machine"] == here
    assert same_weights(out, tmp_path / "whole")  # (really the same machine: the same bits)


def test_a_fresh_fine_tune_and_a_finished_one_are_not_resumes(tmp_path):
    """Only a checkpoint is compared: a finished run is reused wherever it was made."""
    base = make_base(tmp_path / "base")
    out = tmp_path / "run"
    argv = ["finetune", "--base", str(base), "--out", str(out), *ARGS]
    assert main(argv) == 0
    _other_machine(out / "dem_train.json", threads=3)
    assert main(argv) == 0


@pytest.fixture()
def project(tmp_path):
    books = tmp_path / "notebooks"
    books.mkdir()
    write = "open(run_dir + '/log.txt', 'a').write('{}\\n')"
    _notebook(books / "01_first.ipynb", write.format("first"))
    _notebook(books / "02_second.ipynb", write.format("second"))
    params = tmp_path / "p.yaml"
    params.write_text("seed: 3\n")
    return books, params, tmp_path / "run"


def test_dem_run_reuses_chapters_from_another_machine_only_with_allow_mix(project, monkeypatch):
    books, params, out = project
    monkeypatch.setenv("DEM_ALLOW_MIX", "0")  # run(allow_mix=True) sets it for the kernels
    quiet = {"notebook_dir": books, "log": lambda *_: None}
    run(params, out, **quiet)
    manifest = out / "manifest.json"
    here = _other_machine(manifest, threads=99, device="cuda")
    assert here["torch"] == torch.__version__ and here["threads"] >= 1
    with pytest.raises(DemError, match=r"threads 99 \(now \d+\).*--allow-mix") as refused:
        run(params, out, **quiet)
    assert "device cuda (now cpu)" in str(refused.value)
    assert (out / "log.txt").read_text() == "first\nsecond\n"  # nothing ran

    run(params, out, allow_mix=True, **quiet)
    record = json.loads(manifest.read_text())
    assert record["resumed_from_machine"]["threads"] == 99 and record["machine"] == here
    assert (out / "log.txt").read_text() == "first\nsecond\n"  # reused, not rerun

    _other_machine(manifest, torch="1.0.0")
    run(params, out, force=True, **quiet)  # everything recomputed here: nothing is mixed
    assert (out / "log.txt").read_text().count("first") == 2
    assert "resumed_from_machine" not in json.loads(manifest.read_text())
