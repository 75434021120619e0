"""Search the merge weights ``w`` on validation data, evaluating every candidate in memory.

The official DEM code writes one merged checkpoint per candidate and evaluates it separately.
Here the live model's parameters are overwritten with ``theta_base + sum_i w_i * v_i`` on its
own device (the base and the vectors are kept there in float32), so a candidate costs a few
vector additions plus its evaluation — no disk, no reload.

Three strategies share one interface (:func:`search_weights`): the paper's Cartesian ``grid``,
``random`` sampling, and ``coordinate`` ascent (sweep one source's weight at a time, keep the
best, repeat), which needs far fewer evaluations than the grid when there are many sources.
Every trial comes back as one row of a table; the best is chosen on validation only.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch

from dem import DemError
from dem.methods import METHODS, check_weights, get_method, resolve_params, tensor_generator

STRATEGIES = ("grid", "random", "coordinate")
# Lower is better for losses; higher for scores. The objective is the mean over sources.
MINIMIZE = {"loss": True, "accuracy": False}


class InMemoryMerge:
    """Overwrite a live model's weights with merges of its base and distribution vectors.

    ``vectors`` maps a source name to a state dict ``{tensor name: v_i}`` (as written by
    ``dem vectors extract``). Floating-point parameters are merged; the model's other tensors
    (integer buffers, rotary caches) are left as they are. A parameter tied to another one
    (``lm_head`` sharing the embedding) is merged once, through the name the model keeps.
    """

    def __init__(self, model: torch.nn.Module, vectors: Mapping[str, Mapping[str, torch.Tensor]]):
        if not vectors:
            raise DemError("no distribution vectors given: need at least one source")
        self.model = model
        self.sources = list(vectors)
        # named_parameters() drops duplicates, so a tied lm_head appears once (as the embedding).
        self.params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        self.theta_base = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.vectors: dict[str, dict[str, torch.Tensor]] = {}
        for source, vector in vectors.items():
            missing = [n for n in self.params if n not in vector]
            if missing:
                raise DemError(
                    f"distribution vector {source!r} has no tensor {missing[0]!r} "
                    f"({len(missing)} of the model's parameters missing)"
                )
            stored = {}
            for n, p in self.params.items():
                if tuple(vector[n].shape) != tuple(p.shape):
                    raise DemError(
                        f"distribution vector {source!r}: tensor {n!r} has shape "
                        f"{tuple(vector[n].shape)}, the model expects {tuple(p.shape)}"
                    )
                stored[n] = vector[n].to(device=p.device, dtype=torch.float32)
            self.vectors[source] = stored

    @torch.no_grad()
    def apply(self, w: Mapping[str, float] | Sequence[float]) -> None:
        """Set the model to DEM's ``theta_base + sum_i w_i * v_i`` (arithmetic in float32).

        Accumulated onto θ0 (θ0 + w_1·v_1 + …), skipping the zero weights most grid candidates
        have; :meth:`apply_method` adds θ0 last, as :func:`dem.merge.merge` does, so the two
        can differ in the last bit.
        """
        weights = self._weights(w)
        used = [s for s, w_i in weights.items() if w_i != 0.0]
        dem = METHODS["dem"]
        for n, p in self.params.items():
            vectors = [self.vectors[s][n] for s in used]
            p.copy_(dem.merge(self.theta_base[n], vectors, [weights[s] for s in used], {},
                              onto_base=True))  # fmt: skip

    @torch.no_grad()
    def apply_method(self, method: str, w: Mapping[str, float] | Sequence[float], **params):
        """Set the model to the merge of any method of :mod:`dem.methods` (TIES, DARE, ...), with
        the parameters, checks and per-tensor DARE seeds of the streaming :func:`dem.merge.merge`."""
        m = get_method(method)
        weights = check_weights(list(self._weights(w).values()))
        params = resolve_params(m, params)
        for n, p in self.params.items():
            base = self.theta_base[n]
            vectors = [self.vectors[s][n] for s in self.sources]
            if m.on_models:
                vectors = [base + v for v in vectors]
            elif m.overwrites:  # the stored vectors serve every later candidate
                vectors = [v.clone() for v in vectors]
            p.copy_(m.merge(base, vectors, weights, params, tensor_generator(m, params, n)))

    def restore_base(self) -> None:
        self.apply([0.0] * len(self.sources))

    def _weights(self, w: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
        if isinstance(w, Mapping):
            unknown = set(w) - set(self.sources)
            if unknown:
                raise DemError(
                    f"weights name unknown sources {sorted(unknown)}; known: {self.sources}"
                )
            return {s: float(w.get(s, 0.0)) for s in self.sources}
        if len(w) != len(self.sources):
            raise DemError(f"expected {len(self.sources)} weights ({self.sources}), got {len(w)}")
        return {s: float(x) for s, x in zip(self.sources, w, strict=True)}


def search_weights(
    score: Callable[[dict[str, float]], dict[str, float]],
    sources: Sequence[str],
    strategy: str = "grid",
    *,
    values: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n_trials: int = 32,
    low: float = 0.0,
    high: float = 1.0,
    rounds: int = 2,
    seed: int = 0,
    minimize: bool = True,
    include_individuals: bool = True,
) -> pd.DataFrame:
    """Evaluate candidate weights and return every trial as a table, best first.

    ``score(w)`` returns a dict with at least ``"objective"`` (plus any per-source metrics to
    record). ``grid`` tries the Cartesian product of ``values``; ``random`` draws ``n_trials``
    points uniformly from ``[low, high]^K`` (seeded); ``coordinate`` starts with every weight at the
    value nearest 1/K and sweeps each source's weight over ``values`` in
    turn, for ``rounds`` rounds, keeping the best. A candidate seen before is not re-evaluated.

    ``include_individuals`` (on by default) first evaluates the K one-hot weights, i.e. each
    individual fine-tune θ0 + vᵢ exactly, whatever the strategy: a weight search that could
    pick a merge scoring worse on validation than simply using the best single fine-tune would
    be a search that loses to its own inputs. (The grid contains them already when ``values``
    holds 0 and 1; they are then not evaluated twice.)
    """
    if strategy not in STRATEGIES:
        raise DemError(
            f"unknown search strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    sources = list(sources)
    if not sources:
        raise DemError("weight search needs at least one source")
    rows: list[dict] = []
    seen: dict[tuple[float, ...], dict] = {}

    def evaluate(candidate: Sequence[float]) -> float:
        key = tuple(round(float(x), 10) for x in candidate)
        if key not in seen:
            result = dict(score(dict(zip(sources, key, strict=True))))
            row = {"trial": len(rows), **{f"w_{s}": x for s, x in zip(sources, key, strict=True)}}
            row.update(result)
            rows.append(row)
            seen[key] = row
        return seen[key]["objective"]

    better = (lambda a, b: a < b) if minimize else (lambda a, b: a > b)
    if include_individuals:
        for i in range(len(sources)):
            evaluate([float(i == j) for j in range(len(sources))])
    if strategy == "grid":
        for candidate in itertools.product(values, repeat=len(sources)):
            evaluate(candidate)
    elif strategy == "random":
        generator = torch.Generator().manual_seed(seed)
        points = low + (high - low) * torch.rand(n_trials, len(sources), generator=generator)
        for candidate in points.tolist():
            evaluate(candidate)
    else:
        start = min(values, key=lambda x: abs(x - 1.0 / len(sources)))
        best = [start] * len(sources)
        best_score = evaluate(best)
        for _ in range(rounds):
            improved = False
            for i in range(len(sources)):
                for value in values:
                    candidate = best[:i] + [value] + best[i + 1 :]
                    result = evaluate(candidate)
                    if better(result, best_score):
                        best, best_score, improved = candidate, result, True
            if not improved:
                break
    table = pd.DataFrame(rows)
    return table.sort_values("objective", ascending=minimize, kind="stable").reset_index(drop=True)


def best_weights(trials: pd.DataFrame) -> dict[str, float]:
    """The weights of the first (best) row of a table from :func:`search_weights`."""
    best = trials.iloc[0]
    return {c.removeprefix("w_"): float(best[c]) for c in trials.columns if c.startswith("w_")}


def validation_scorer(
    merger: InMemoryMerge,
    tokenizer,
    sources: Sequence,
    *,
    metric: str = "loss",
    max_examples: int | None = None,
    batch_size: int = 64,
    method: str = "dem",
    **method_options,
) -> Callable[[dict[str, float]], dict[str, float]]:
    """A ``score(w)`` for :func:`search_weights`: merge in memory, evaluate on validation.

    Records the time spent merging and evaluating each candidate, so the overhead of the
    in-memory merge can be measured against the evaluation it serves.
    """
    from dem.evaluate import evaluate

    if metric not in MINIMIZE:
        raise DemError(f"unknown search metric {metric!r}; choose one of {', '.join(MINIMIZE)}")

    def score(w: dict[str, float]) -> dict[str, float]:
        t0 = time.perf_counter()
        if method == "dem":
            merger.apply(w)
        else:
            merger.apply_method(method, w, **method_options)
        _sync(merger.model)
        t1 = time.perf_counter()
        table = evaluate(
            merger.model,
            tokenizer,
            list(sources),
            "validation",
            metrics=(metric,),
            max_examples=max_examples,
            batch_size=batch_size,
        )
        t2 = time.perf_counter()
        values = table[table["metric"] == metric].set_index("source")["value"]
        result = {"objective": float(values.mean())}
        result.update({f"{metric}/{s}": float(v) for s, v in values.items()})
        result.update({"merge_s": t1 - t0, "eval_s": t2 - t1})
        return result

    return score


def _sync(model: torch.nn.Module) -> None:
    # CUDA kernels are asynchronous: without a sync the merge time would be charged to eval.
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
