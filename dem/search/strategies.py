"""Weight-search strategies, one record each (as merge methods are in :mod:`dem.merging.methods`).

A strategy is a function that proposes candidate weights through :meth:`Trials.evaluate`, which
scores each once and keeps it as one row; :func:`dem.search.weights.search_weights` dispatches to the
record by name and passes it only the options its function takes. Adding a strategy is one
function and one :class:`Strategy` in :data:`STRATEGIES` (plus its test).
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from dem import DemError
from dem.search.gradient import descend

GRID_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)


class Trials:
    """The candidates one search has scored, in order, one row each: ``trial``, the weights
    (``w_<name>``), what ``score`` returned, and ``elapsed_s`` since the search began (strategy
    work such as gradient steps included). A candidate seen before is answered from its row."""

    def __init__(self, score, names: Sequence[str], *, minimize: bool, include_individuals: bool):
        self.score, self.names, self.minimize = score, list(names), minimize
        self.rows: list[dict] = []
        self._seen: dict[tuple[float, ...], dict] = {}
        self._began = time.perf_counter()
        owner = [name.split("@")[0] for name in self.names]  # the source each weight belongs to
        self.n_sources = len(set(owner))
        one_hot = [[float(o == source) for o in owner] for source in dict.fromkeys(owner)]
        self.individuals = one_hot if include_individuals else []

    def evaluate(self, candidate: Sequence[float]) -> float:
        """Score ``candidate`` (one weight per name, in order) unless seen; its objective."""
        key = tuple(round(float(x), 10) for x in candidate)
        if key not in self._seen:
            result = dict(self.score(dict(zip(self.names, key, strict=True))))
            row = {
                "trial": len(self.rows),
                **{f"w_{n}": x for n, x in zip(self.names, key, strict=True)},
            }
            row.update(result)
            row["elapsed_s"] = time.perf_counter() - self._began
            self.rows.append(row)
            self._seen[key] = row
        return self._seen[key]["objective"]

    def evaluate_all(self, candidates) -> None:
        for candidate in candidates:
            self.evaluate(candidate)

    def better(self, a: float, b: float) -> bool:
        return a < b if self.minimize else a > b

    def table(self) -> pd.DataFrame:
        table = pd.DataFrame(self.rows)
        return table.sort_values("objective", ascending=self.minimize, kind="stable").reset_index(
            drop=True
        )


def _grid(trials: Trials, *, values: Sequence[float] = GRID_VALUES) -> None:
    """The paper's Cartesian product of ``values`` (V^K candidates)."""
    trials.evaluate_all(itertools.product(values, repeat=len(trials.names)))


def _random(trials: Trials, *, n_trials: int = 32, low: float = 0.0, high: float = 1.0,
            seed: int = 0) -> None:  # fmt: skip
    """``n_trials`` points drawn uniformly from [low, high]^K by a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    points = low + (high - low) * torch.rand(n_trials, len(trials.names), generator=generator)
    trials.evaluate_all(points.tolist())


def _coordinate(trials: Trials, *, values: Sequence[float] = GRID_VALUES, rounds: int = 2,
                start: float | None = None) -> None:  # fmt: skip
    """From every weight at ``start`` (default: the value nearest 1/K), sweep each weight over
    ``values`` in turn, keeping the best; ``rounds`` rounds, or until a round improves nothing.
    Far fewer evaluations than the grid when there are many sources."""
    if start is None:
        start = min(values, key=lambda x: abs(x - 1.0 / len(trials.names)))
    best = [start] * len(trials.names)
    best_score = trials.evaluate(best)
    for _ in range(rounds):
        improved = False
        for i in range(len(best)):
            for value in values:
                candidate = best[:i] + [value] + best[i + 1 :]
                result = trials.evaluate(candidate)
                if trials.better(result, best_score):
                    best, best_score, improved = candidate, result, True
        if not improved:
            break


def _gradient(trials: Trials, *, gradient=None, steps: int = 100, lr: float = 0.05,
              low: float = 0.0, high: float = 1.0, select_every: int = 25,
              start: float | None = None) -> dict:  # fmt: skip
    """Projected Adam on the validation loss: ``gradient(w, step)`` returns (J, ∂J/∂w) at step
    ``step`` (:meth:`InMemoryMerge.loss_and_gradient`; the step picks a minibatch). From every
    weight at ``start`` (default 1/K for K sources) it takes ``steps`` steps of size ``lr``
    inside [low, high], and scores the start, every ``select_every``-th step and the end like
    any candidate, so the choice among them is made by the search's metric. Each step's J and
    w are in ``attrs["gradient_path"]``. The individuals are scored after the descent, which
    does not need them."""
    if gradient is None:
        raise DemError("the gradient strategy needs gradient(w) -> (loss, dloss/dw)")
    if steps < 1 or select_every < 1 or not lr > 0:
        raise DemError(f"gradient search needs steps >= 1, select_every >= 1 and lr > 0; "
                       f"got steps={steps}, select_every={select_every}, lr={lr}")  # fmt: skip
    first = 1.0 / trials.n_sources if start is None else start
    path = descend(trials.evaluate, gradient, trials.names, first, steps=steps, lr=lr,
                   low=low, high=high, select_every=select_every)  # fmt: skip
    return {"gradient_path": pd.DataFrame(path)}


def _tpe(trials: Trials, *, values: Sequence[float] = GRID_VALUES, n_trials: int | None = None,
         low: float | None = None, high: float | None = None, seed: int = 0) -> None:  # fmt: skip
    """Optuna's TPE sampler (seeded with ``seed``) over continuous weights in [low, high]^K,
    by default the range of ``values``; ``n_trials`` scored candidates in all, the individuals
    included (default len(values)**K: the grid's count). The individuals, scored first, are
    told to the sampler where they lie in the range, so it starts from what they scored."""
    import optuna

    low = min(values) if low is None else low
    high = max(values) if high is None else high
    n_trials = len(values) ** len(trials.names) if n_trials is None else n_trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial otherwise
    study = optuna.create_study(direction="minimize" if trials.minimize else "maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))  # fmt: skip
    space = {n: optuna.distributions.FloatDistribution(low, high) for n in trials.names}
    for row in list(trials.rows):
        params = {n: row[f"w_{n}"] for n in trials.names}
        if all(low <= x <= high for x in params.values()):
            study.add_trial(optuna.trial.create_trial(params=params, distributions=space,
                                                      value=row["objective"]))  # fmt: skip

    def objective(trial) -> float:
        return trials.evaluate([trial.suggest_float(n, low, high) for n in trials.names])

    study.optimize(objective, n_trials=max(n_trials - len(trials.rows), 0))


@dataclass(frozen=True)
class Strategy:
    """One weight-search strategy: what it does, and the function that proposes its candidates."""

    name: str
    about: str  # one line, for help and errors
    run: Callable[..., Mapping | None]  # (trials, **options) -> extra attrs of the trials table
    individuals: str = "first"  # when the one-hot candidates are scored: "first" or "last"

    @property
    def params(self) -> tuple[str, ...]:
        """The options it takes: the keywords of :attr:`run`."""
        return tuple(inspect.signature(self.run).parameters)[1:]


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("grid", "the paper's Cartesian grid of `values`, V^K candidates", _grid),
    Strategy("random", "`n_trials` points drawn uniformly from [low, high]^K, seeded", _random),
    Strategy("coordinate", "coordinate ascent over `values`, one weight at a time", _coordinate),
    Strategy("gradient", "projected Adam on the validation loss; its points scored by the metric",
             _gradient, individuals="last"),
    Strategy("tpe", "Optuna's TPE sampler, continuous weights, the grid's count of candidates",
             _tpe),
)}  # fmt: skip


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise DemError(f"unknown search strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
