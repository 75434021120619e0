"""`dem run` on throwaway notebooks: order, skipping, failure reporting, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat as nbf
import pytest

from dem import DemError
from dem.cli import main
from dem.run.pipeline import PARAMS, resolve_params, run


def _notebook(path: Path, body: str) -> None:
    nb = nbf.v4.new_notebook()
    params = nbf.v4.new_code_cell('run_dir: str = "."  # run folder\nseed: int = 0  # a setting')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbf.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbf.write(nb, path)


@pytest.fixture()
def project(tmp_path):
    books = tmp_path / "notebooks"
    books.mkdir()
    log = "from pathlib import Path\nwith open(Path(run_dir) / 'log.txt', 'a') as f: f.write('{}' + str(seed) + '\\n')"
    _notebook(books / "01_first.ipynb", log.format("first"))
    _notebook(books / "02_second.ipynb", log.format("second"))
    params = tmp_path / "p.yaml"
    params.write_text("seed: 3\n")
    return books, params, tmp_path / "run"


def test_runs_in_order_records_manifest_and_skips_unchanged_steps(project):
    books, params, out = project
    run(params, out, notebook_dir=books, log=lambda *_: None)
    assert (out / "log.txt").read_text() == "first3\nsecond3\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["seed"] == 3 and "run_dir" not in manifest["parameters"]
    assert manifest["changed_from_default"] == {"seed": 3}
    assert set(manifest["steps"]) == {"01_first", "02_second"}
    assert {"torch", "papermill", "dem"} <= set(manifest["versions"])
    assert "commit" in manifest["git"] and "cpu_count" in manifest["hardware"]
    assert (out / "notebooks" / "02_second.ipynb").exists()

    run(params, out, notebook_dir=books, log=lambda *_: None)  # nothing changed: both skipped
    assert (out / "log.txt").read_text() == "first3\nsecond3\n"

    _notebook(books / "02_second.ipynb", "open(run_dir + '/log.txt', 'a').write('changed\\n')")
    run(params, out, notebook_dir=books, log=lambda *_: None)  # only the changed step reruns
    assert (out / "log.txt").read_text() == "first3\nsecond3\nchanged\n"

    run(params, out, notebook_dir=books, force=True, log=lambda *_: None)
    assert (out / "log.txt").read_text().count("first3") == 2


def test_failing_notebook_names_notebook_cell_and_error_and_keeps_it(project):
    books, params, out = project
    _notebook(books / "02_second.ipynb", "raise ValueError('bad value here')")
    with pytest.raises(DemError) as err:
        run(params, out, notebook_dir=books, log=lambda *_: None)
    message = str(err.value)
    assert "02_second.ipynb" in message and "cell [3] (raise ValueError" in message
    assert "ValueError: bad value here" in message
    assert (out / "notebooks" / "02_second.ipynb").exists()


def test_unknown_parameter_and_foreign_folder_are_refused(project, tmp_path):
    books, params, out = project
    params.write_text("seed: 1\ntypo_param: 2\n")
    with pytest.raises(DemError, match="typo_param"):
        run(params, out, notebook_dir=books, log=lambda *_: None)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    params.write_text("seed: 1\n")
    with pytest.raises(DemError, match="not a dem run folder"):
        run(params, foreign, notebook_dir=books, log=lambda *_: None)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_cli_reports_missing_parameter_file_in_one_line(capsys, tmp_path):
    assert main(["run", "--params", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.yaml not found" in err[0]


def test_only_and_from_reuse_earlier_chapters_and_refuse_unfinished_ones(project):
    books, params, out = project
    with pytest.raises(DemError, match="01_first has not finished"):
        run(params, out, notebook_dir=books, only="02")
    run(params, out, notebook_dir=books, log=lambda m: None)
    lines = []
    run(params, out, notebook_dir=books, only="02",
                 log=lines.append)  # fmt: skip
    assert lines == ["[dem run] 01_first: reused", "[dem run] 02_second: running"] + [
        line for line in lines[2:] if line.startswith("[dem run] 02_second: done")
    ]
    with pytest.raises(DemError, match="no chapter '07'"):
        run(params, out, notebook_dir=books, start="07")


def test_list_names_chapters_and_parameter_sets(capsys):
    assert main(["run", "--list"]) == 0
    shown = capsys.readouterr().out
    assert "04_weighted_merging" in shown and "Weighted merging" in shown
    assert all(f"  {name} " in shown for name in ("default", "scratch", "smoke"))
    assert resolve_params("smoke") == PARAMS / "smoke.yaml"
