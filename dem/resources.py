"""Where the tutorial's files are: in a checkout, or in the copy an installed dem carries.

The notebooks, the parameter sets, the fact table and the shipped bases live at the top of the
repository (``notebooks/``, ``data/``), where people read and edit them. A ``pip install .`` (or
a wheel) copies them to ``<prefix>/share/dem/`` (``[tool.setuptools.data-files]`` in
pyproject.toml), so an installed ``dem run`` works from any folder. A checkout wins when there
is one: an editable install runs the notebooks you are editing.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
INSTALLED = Path(sys.prefix) / "share" / "dem"
ROOT = CHECKOUT if (CHECKOUT / "notebooks").is_dir() else INSTALLED
NOTEBOOKS = ROOT / "notebooks"
PARAMS = NOTEBOOKS / "params"
# dem sweep's files sit beside dem run's parameter sets, named sweep*.yaml; its chapter (07) sits
# beside the tutorial's but reads a sweep's tables, so dem run does not execute it.
SWEEP_FILES = "sweep*.yaml"
SWEEP_CHAPTER = NOTEBOOKS / "07_when_dem_works.ipynb"


def run_parameter_sets(folder: Path = PARAMS) -> list[Path]:
    """dem run's shipped parameter sets: every YAML file in ``folder`` but the sweeps."""
    sweeps = set(folder.glob(SWEEP_FILES))
    return sorted(p for p in folder.glob("*.yaml") if p not in sweeps)


def sweep_files(folder: Path = PARAMS) -> list[Path]:
    """dem sweep's shipped sweep files."""
    return sorted(folder.glob(SWEEP_FILES))


DATA = ROOT / "data"
