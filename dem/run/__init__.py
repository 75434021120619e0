"""Running the tutorial: the chapters executed into a run folder, published, repeated.

* :mod:`~dem.run.pipeline` -- ``dem run``: the chapters in order, each executed headless by
  :mod:`~dem.run.execute`;
* :mod:`~dem.run.publish` -- a finished run as Markdown;
* :mod:`~dem.run.seeds` -- several seeds of the whole run, and their mean ± sd;
* :mod:`~dem.run.sweep` -- ``dem sweep``: the run over a grid (its file read by
  :mod:`~dem.run.sweep_config`, its tables written by :mod:`~dem.run.sweep_tables`).
"""

__all__ = ["pipeline", "publish", "seeds", "sweep"]
