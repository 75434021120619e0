"""dem run's notebook execution: no kernel warning, section lines, bars outside the notebook."""

from __future__ import annotations

import nbformat as nbf

from dem.run.execute import run_notebook, sections


def _notebook(path):
    nb = nbf.v4.new_notebook()
    nb.cells = [
        nbf.v4.new_markdown_cell("# Title\n\nintro"),
        nbf.v4.new_markdown_cell("## 1. First part"),
        nbf.v4.new_code_cell(
            "from dem import progress\n"
            "for _ in progress.bar(range(3), desc='counting'):\n"
            "    pass\n"
            "print('visible')"
        ),
        nbf.v4.new_markdown_cell("## 2. Second part"),
        nbf.v4.new_code_cell("x = 1"),
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbf.write(nb, path)


def test_sections_bars_and_no_kernel_warning(tmp_path, capfd):
    _notebook(tmp_path / "01_demo.ipynb")
    lines = []
    run_notebook(tmp_path / "01_demo.ipynb", tmp_path / "out.ipynb", {}, tmp_path, log=lines.append)
    assert lines == ["[dem run] 01_demo · 1. First part", "[dem run] 01_demo · 2. Second part"]
    terminal = capfd.readouterr()
    assert "counting: 100%" in terminal.err  # the bar reached this process's terminal ...
    assert "without encryption" not in terminal.out + terminal.err
    executed = nbf.read(tmp_path / "out.ipynb", 4)
    outputs = str(executed.cells[2].outputs)
    assert "visible" in outputs and "counting" not in outputs  # ... and not the notebook
    assert sections(tmp_path / "01_demo.ipynb") == {1: "1. First part", 3: "2. Second part"}


def test_quiet_shows_nothing_but_the_notebook_output(tmp_path, capfd):
    _notebook(tmp_path / "01_demo.ipynb")
    lines = []
    run_notebook(tmp_path / "01_demo.ipynb", tmp_path / "out.ipynb", {}, tmp_path,
                 log=lines.append, quiet=True)  # fmt: skip
    assert lines == [] and "counting" not in capfd.readouterr().err
    assert "visible" in str(nbf.read(tmp_path / "out.ipynb", 4).cells[2].outputs)
