"""DEM, the Distribution Edited Model (Ram et al., EMNLP 2024).

Fine-tune one base model per data source, take each difference to the base as a
distribution vector ``v_i = theta_i - theta_base``, and merge
``theta_DEM = theta_base + sum_i w_i * v_i`` with weights searched on validation data.

The package is deliberately light to import: heavy libraries (torch, transformers,
datasets) are imported by the submodules that need them, so ``dem merge`` starts fast.
"""

import os
from pathlib import Path

__version__ = "0.1.0"

# torch's OpenMP workers spin-wait for work by default, which makes two threads five times
# slower than one as soon as another process needs a core of a 2-core machine; waiting
# passively keeps that case near one thread's speed and still gains 1.5x on an idle machine
# (measured: dem.models' thread rule). libgomp reads this when torch is first imported, so it is
# set here, before any dem module imports torch; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cache_dir() -> Path:
    """dem's cache (file digests, converted bases): $DEM_CACHE_DIR, else $XDG_CACHE_HOME/dem."""
    if os.environ.get("DEM_CACHE_DIR"):
        return Path(os.environ["DEM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dem"


class DemError(Exception):
    """An error the user can fix: the message names the file, tensor or parameter at fault.

    The command line prints it as one line on stderr and exits non-zero, without a traceback;
    Jupyter shows the same one line (IPython asks an exception for ``_render_traceback_``).
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]
