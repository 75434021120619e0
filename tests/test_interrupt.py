"""A killed `dem run` continues from its last checkpoint and ends with the same numbers.

The run is killed hard (SIGKILL to `dem run` and its kernel, as a power cut or an OOM kill
would) in the middle of a fine-tune, after its first checkpoint; the same command is run again.
Chapters 01-02 on the smoke parameters with longer fine-tunes (time to catch one mid-way),
compared with an uninterrupted run: the fine-tuned weights must be bit-identical and the test
scores equal.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from safetensors.torch import load_file

from dem.run.pipeline import NOTEBOOKS, PARAMS

CHAPTERS = ("01_data_sources.ipynb", "02_finetuning.ipynb")


def _command(params: Path, books: Path, out: Path) -> list[str]:
    code = (
        "from dem.run import pipeline; "
        f"pipeline.run({str(params)!r}, {str(out)!r}, notebook_dir={str(books)!r}, quiet=True)"
    )
    return [sys.executable, "-c", code]


def _kill_tree(process: subprocess.Popen) -> None:
    parent = psutil.Process(process.pid)
    family = [*parent.children(recursive=True), parent]
    for p in family:
        p.kill()
    psutil.wait_procs(family, timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    books = root / "notebooks"
    books.mkdir()
    for name in CHAPTERS:
        shutil.copy(NOTEBOOKS / name, books / name)
    params = yaml.safe_load((PARAMS / "smoke.yaml").read_text())
    params.update(finetune_steps=40, source_steps={}, eval_every=5)
    params = {k: v for k, v in params.items() if k in _declared(books)}
    (root / "p.yaml").write_text(yaml.safe_dump(params))
    return root, books


def _declared(books: Path) -> set[str]:
    import papermill as pm

    return {name for nb in books.glob("*.ipynb") for name in pm.inspect_notebook(str(nb))}


def test_killed_run_resumes_to_the_same_weights_and_scores(setup):
    root, books = setup
    params = root / "p.yaml"
    reference, resumed = root / "reference", root / "resumed"
    subprocess.run(_command(params, books, reference), check=True, capture_output=True)

    process = subprocess.Popen(_command(params, books, resumed), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    checkpoint = None
    while checkpoint is None and time.monotonic() < deadline and process.poll() is None:
        found = list((resumed / "models" / "ft").glob("*.partial/checkpoint/state.json"))
        checkpoint = found[0] if found else None
        time.sleep(0.05)
    assert checkpoint is not None, "the run finished or failed before a fine-tune checkpointed"
    _kill_tree(process)
    partial = checkpoint.parents[1]
    assert partial.exists(), "nothing left to resume: the kill came too late"
    saved = json.loads((partial / "checkpoint" / "state.json").read_text())["log"]

    again = subprocess.run(_command(params, books, resumed), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    name = partial.name.removesuffix(".partial")
    # Resumed, not restarted: the steps before the checkpoint keep the timings measured by the
    # killed process (a restart would measure new ones).
    log = pd.read_csv(resumed / "models" / "ft" / name / "train_log.csv")
    assert log.wall_s.iloc[0] == pytest.approx(saved[0]["wall_s"], rel=0, abs=0)
    assert len(saved) < len(log)
    for run in (reference, resumed):
        assert not list((run / "models" / "ft").glob("*.partial")), run
    for source in sorted(p.name for p in (reference / "models" / "ft").iterdir()):
        a = load_file(reference / "models" / "ft" / source / "model.safetensors")
        b = load_file(resumed / "models" / "ft" / source / "model.safetensors")
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), f"{source} differs (interrupted: {name})"
    table = "tables/02_individual_test.csv"
    pd.testing.assert_frame_equal(pd.read_csv(reference / table), pd.read_csv(resumed / table))
