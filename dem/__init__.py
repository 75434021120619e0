"""DEM, the Distribution Edited Model (Ram et al., EMNLP 2024).

Fine-tune one base model per data source, take each difference to the base as a
distribution vector ``v_i = theta_i - theta_base``, and merge
``theta_DEM = theta_base + sum_i w_i * v_i`` with weights searched on validation data.

The package is deliberately light to import: heavy libraries (torch, transformers,
datasets) are imported by the submodules that need them, so ``dem merge`` starts fast.
"""

__version__ = "0.1.0"


class DemError(Exception):
    """An error the user can fix: the message names the file, tensor or parameter at fault.

    The command line prints it as one line on stderr and exits non-zero, without a traceback.
    """
