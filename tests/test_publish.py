"""dem publish: a finished run's chapters as Markdown with their figures."""

from __future__ import annotations

import base64
import json

import nbformat as nbf
import pytest

from dem import DemError
from dem.cli import main

# A 1x1 PNG: enough for nbconvert to write an image file.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
    )
).decode()


def _run(folder, finished=True):
    (folder / "notebooks").mkdir(parents=True)
    nb = nbf.v4.new_notebook()
    cell = nbf.v4.new_code_cell("plot()")
    cell.outputs = [nbf.v4.new_output("display_data", data={"image/png": PNG})]
    nb.cells = [nbf.v4.new_markdown_cell("# 01 · Demo"), cell]
    nbf.write(nb, folder / "notebooks" / "01_demo.ipynb")
    manifest = {"params_file": "/x/default.yaml", "seed": 0, "git": {"commit": "abc"},
                "steps": {"01_demo": {"wall_s": 12.3}}}  # fmt: skip
    if finished:
        manifest["finished"] = "2026-01-01T00:00:00"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "metrics.json").write_text("{}")


def test_publish_writes_markdown_figures_and_an_index(tmp_path, capsys):
    _run(tmp_path / "run")
    assert main(["publish", str(tmp_path / "run"), "--out", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "01_demo.md").read_text()
    assert "# 01 · Demo" in text and "01_demo_files/" in text
    assert list((tmp_path / "docs" / "01_demo_files").glob("*.png"))
    index = (tmp_path / "docs" / "README.md").read_text()
    assert "[01_demo](01_demo.md) | 12 |" in index and "`abc`" in index
    # an existing output is not replaced unless asked
    assert main(["publish", str(tmp_path / "run"), "--out", str(tmp_path / "docs")]) == 2
    assert "exists" in capsys.readouterr().err


def test_an_unfinished_run_is_refused(tmp_path):
    _run(tmp_path / "run", finished=False)
    with pytest.raises(DemError, match="has not finished"):
        from dem.run.publish import publish

        publish(tmp_path / "run", tmp_path / "docs")
    assert not (tmp_path / "docs").exists()
