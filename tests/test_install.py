"""An installed dem (pip install ., not editable) runs the tutorial from any folder.

A fresh virtual environment (system site-packages for torch & co., so nothing is downloaded)
gets a non-editable install of this checkout; then `dem run --params smoke` runs from an
unrelated folder. It must find the notebooks and parameter sets the install carries, show its
sections and progress, and print no kernel warning.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_non_editable_install_runs_the_smoke_tutorial_from_anywhere(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-build-isolation", str(REPO)],
        check=True,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import dem, dem.resources as r; print(dem.__file__); print(r.ROOT)"],
        cwd=elsewhere, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert where[0].startswith(str(env_dir)), f"imported {where[0]}, not the installed copy"
    assert where[1] == str(env_dir / "share" / "dem")

    done = subprocess.run(
        [str(env_dir / "bin" / "dem"), "run", "--params", "smoke", "--out", "run"],
        cwd=elsewhere, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[dem run] 02_finetuning · 2. Fine-tune once per source" in done.stdout
    assert "training arithmetic" in done.stderr  # a progress bar reached the terminal
    assert "without encryption" not in done.stdout + done.stderr
    manifest = json.loads((elsewhere / "run" / "manifest.json").read_text())
    assert manifest["params_file"] == str(
        env_dir / "share" / "dem" / "notebooks" / "params" / "smoke.yaml"
    )
    assert (elsewhere / "run" / "metrics.json").is_file()
