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
SWEEPS = NOTEBOOKS / "sweeps"  # dem sweep's files and chapter 07, which reads their tables
DATA = ROOT / "data"
