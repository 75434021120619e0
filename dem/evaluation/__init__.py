"""Evaluation: how a model is scored on a source, and the tables the scores go into.

It comes before training because the training loop's validation loss is this stage's response
loss, and before the weight search because every candidate merge is scored the same way:

* :mod:`~dem.evaluation.evaluate` -- response loss, greedy-generation accuracy, multiple choice;
* :mod:`~dem.evaluation.harness` -- the same model folders scored by lm-evaluation-harness;
* :mod:`~dem.evaluation.results` -- model folders scored into tables, and a run's
  ``metrics.json``, costs and claims (chapter 06).
"""

__all__ = ["evaluate", "harness", "results"]
