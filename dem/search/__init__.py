"""Search: the merge weights w chosen on validation data, and the rivals DEM is compared with.

* :mod:`~dem.search.weights` -- every candidate merged and scored in memory; its names are this
  package's, so a chapter writes ``from dem.search import search_weights``;
* :mod:`~dem.search.strategies` -- how candidates are proposed (grid, random, coordinate, tpe,
  gradient), one record each; :mod:`~dem.search.gradient` -- the gradient in w and the descent;
* :mod:`~dem.search.baselines` -- chapter 04's merging baselines and their λ search;
* :mod:`~dem.search.ensemble` -- the output-space ensemble of the fine-tunes (MDE).

Modules of this package import each other directly (``from dem.search.weights import ...``),
never through this file, which imports them.
"""

from dem.search.weights import (
    MINIMIZE,
    InMemoryMerge,
    best_weights,
    search_weights,
    validation_objective,
    validation_scorer,
)

__all__ = [
    "MINIMIZE",
    "InMemoryMerge",
    "best_weights",
    "search_weights",
    "validation_objective",
    "validation_scorer",
    "baselines",
    "ensemble",
    "gradient",
    "strategies",
    "weights",
]
