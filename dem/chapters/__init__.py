"""What the chapters call: their set-up, their experiments, analyses and figures.

* :mod:`~dem.chapters.notebook` -- every chapter's first and last call (:func:`setup`);
* :mod:`~dem.chapters.experiments` -- the chapters' experiments, each one call;
* :mod:`~dem.chapters.analysis` and :mod:`~dem.chapters.connectivity` -- what distribution
  vectors look like, and when they merge (chapter 03);
* :mod:`~dem.chapters.scale` -- when DEM works, read from a sweep (chapter 07);
* :mod:`~dem.chapters.plots` and :mod:`~dem.chapters.display` -- figures, and how tables and
  notes show.
"""

__all__ = ["analysis", "connectivity", "display", "experiments", "notebook", "plots", "scale"]
