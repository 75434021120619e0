"""Search the merge weights ``w`` on validation data, evaluating every candidate in memory.

The official DEM code writes one merged checkpoint per candidate and evaluates it separately.
Here the live model's parameters are overwritten with ``theta_base + sum_i w_i * v_i`` on its
own device (the base and the vectors are kept there in float32), so a candidate costs a few
vector additions plus its evaluation — no disk, no reload.

The strategies are records in one registry, :data:`dem.search.strategies.STRATEGIES` (as merge
methods are in :mod:`dem.merging.methods`): the paper's Cartesian ``grid``, ``random`` sampling, ``coordinate`` ascent
(sweep one source's weight at a time, keep the best, repeat), which needs far fewer evaluations
than the grid when there are many sources, Optuna's ``tpe`` sampler over continuous weights, and
``gradient`` descent on the validation loss. The last uses what makes DEM special: the merge
θ(w) = θ0 + Σ_i w_i·v_i is linear in w, so ∂L/∂w_i = Σ_tensors ⟨∇_θ L(θ(w)), v_i⟩ — one forward
and backward pass gives the derivative for every source at once (:meth:`InMemoryMerge.
loss_and_gradient`), and for one weight per source *and block of layers* as cheaply
(``granularity="layer"``). Adding a strategy is one function and one :class:`Strategy`. Every
trial comes back as one row of a table (:class:`dem.search.strategies.Trials`); the best is chosen on validation
only, by the same metric whatever the strategy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch

from dem import DemError
from dem.merging.methods import METHODS, check_weights, get_method, resolve_params, tensor_generator
from dem.search.gradient import block_rank, is_per_block, loss_and_gradient, tensor_blocks
from dem.search.strategies import STRATEGIES, Trials, get_strategy

GRANULARITIES = ("source", "layer")
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
        # float32 arithmetic (float64 for a float64 model: exact checks of the derivative)
        self.dtypes = {
            n: torch.promote_types(p.dtype, torch.float32) for n, p in self.params.items()
        }
        self.theta_base = {n: p.detach().to(self.dtypes[n]).clone() for n, p in self.params.items()}
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
                stored[n] = vector[n].to(device=p.device, dtype=self.dtypes[n])
            self.vectors[source] = stored
        self.block_of = tensor_blocks(self.params)
        self.blocks = list(dict.fromkeys(sorted(self.block_of.values(), key=block_rank)))

    def weight_names(self, granularity: str = "source") -> list[str]:
        """The names of the weights a search sets: one per source (``"facts"``), or one per source
        and block of layers (``"facts@layer3"``; blocks are ``embed``, ``layer<i>``, ``head``)."""
        if granularity not in GRANULARITIES:
            raise DemError(f"unknown granularity {granularity!r}; choose one of "
                           f"{', '.join(GRANULARITIES)}")  # fmt: skip
        if granularity == "source":
            return list(self.sources)
        return [f"{s}@{b}" for s in self.sources for b in self.blocks]

    @torch.no_grad()
    def apply(self, w: Mapping[str, float] | Sequence[float]) -> None:
        """Set the model to DEM's ``theta_base + sum_i w_i * v_i`` (arithmetic in float32).

        Accumulated onto θ0 (θ0 + w_1·v_1 + …), skipping the zero weights most grid candidates
        have; :meth:`apply_method` adds θ0 last, as :func:`dem.merging.merge.merge` does, so the two
        can differ in the last bit.
        """
        dem = METHODS["dem"]
        if is_per_block(w):  # one weight per source and block: {block: {source: w_i}}
            by_block = self._block_weights(w)
        else:
            by_block = dict.fromkeys(self.blocks, self._weights(w))
        for n, p in self.params.items():
            weights = by_block[self.block_of[n]]
            used = [s for s, w_i in weights.items() if w_i != 0.0]
            p.copy_(dem.merge(self.theta_base[n], [self.vectors[s][n] for s in used],
                              [weights[s] for s in used], {}, onto_base=True))  # fmt: skip

    def loss_and_gradient(
        self, w: Mapping[str, float], batches: Mapping[str, Sequence[Mapping[str, torch.Tensor]]]
    ) -> tuple[float, dict[str, float]]:
        """The validation loss at θ(w) and its derivative for every weight in ``w`` (see
        :func:`dem.search.gradient.loss_and_gradient`); the model is left at θ(w)."""
        return loss_and_gradient(self, w, batches)

    @torch.no_grad()
    def apply_method(self, method: str, w: Mapping[str, float] | Sequence[float], **params):
        """Set the model to the merge of any method of :mod:`dem.merging.methods` (TIES, DARE, ...), with
        the parameters, checks and per-tensor DARE seeds of the streaming :func:`dem.merging.merge.merge`."""
        m = get_method(method)
        m.check_models(len(self.sources))
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

    def set_merge(self, method: str, w: Mapping[str, float] | Sequence[float], **options) -> None:
        """Set the model to ``method``'s merge: DEM by :meth:`apply` (the searches' summation
        order, per-layer weights allowed), every other method by :meth:`apply_method`."""
        if method == "dem" and not options:
            self.apply(w)
        else:
            self.apply_method(method, w, **options)

    def restore_base(self) -> None:
        self.apply([0.0] * len(self.sources))

    def _block_weights(self, w: Mapping[str, float]) -> dict[str, dict[str, float]]:
        """Per-layer weights as {block: {source: w_i}}, every source of every block present."""
        expected = self.weight_names("layer")
        unknown = sorted(set(w) - set(expected))
        if unknown:
            raise DemError(f"per-layer weights name unknown source@block {unknown[:3]}; "
                           f"known: {expected[:3]}... ({len(expected)} in all)")  # fmt: skip
        return {b: {s: float(w.get(f"{s}@{b}", 0.0)) for s in self.sources} for b in self.blocks}

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
    minimize: bool = True,
    include_individuals: bool = True,
    **options,
) -> pd.DataFrame:
    """Evaluate candidate weights with one strategy of :data:`STRATEGIES`; every trial as a row
    of a table, best first (ties: the earlier trial).

    ``score(w)`` returns a dict with at least ``"objective"`` (plus any per-source metrics to
    record); the best is the lowest objective when ``minimize``, else the highest. ``options``
    are the strategy's keywords (its record's :attr:`Strategy.params`, documented on its
    function); one that only another strategy takes is ignored, so one call can carry every
    strategy's settings, and one that no strategy takes is an error.

    ``include_individuals`` (on by default) also evaluates the K one-hot weights, i.e. each
    individual fine-tune θ0 + vᵢ exactly, whatever the strategy: a weight search that could
    pick a merge scoring worse on validation than simply using the best single fine-tune would
    be a search that loses to its own inputs. A candidate seen before is not re-evaluated (the
    grid contains the individuals when ``values`` holds 0 and 1). ``sources`` may name one
    weight per source and block (``"facts@layer3"``, :meth:`InMemoryMerge.weight_names`); the
    individuals are then each source's blocks all at 1.
    """
    chosen = get_strategy(strategy)
    unknown = sorted(set(options) - {p for s in STRATEGIES.values() for p in s.params})
    if unknown:
        raise DemError(f"unknown search option {unknown[0]!r}; the strategies take "
                       f"{', '.join(sorted({p for s in STRATEGIES.values() for p in s.params}))}")  # fmt: skip
    if not sources:
        raise DemError("weight search needs at least one source")
    trials = Trials(score, sources, minimize=minimize, include_individuals=include_individuals)
    if chosen.individuals == "first":
        trials.evaluate_all(trials.individuals)
    attrs = chosen.run(trials, **{k: v for k, v in options.items() if k in chosen.params})
    if chosen.individuals == "last":
        trials.evaluate_all(trials.individuals)
    table = trials.table()
    table.attrs.update(attrs or {})
    return table


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
    in-memory merge can be measured against the evaluation it serves. A candidate this scorer
    has scored before (the landscape and the gradient searches meet grid points and the
    individuals again) is answered from memory, at zero cost, without touching the model: the
    merge and the evaluation are deterministic, so the numbers are the same. ``score(w,
    **options)`` overrides the method's options for one candidate (a λ search varies ``lam``);
    they are part of what is remembered.
    """
    if metric not in MINIMIZE:
        raise DemError(f"unknown search metric {metric!r}; choose one of {', '.join(MINIMIZE)}")
    scored: dict[tuple, dict[str, float]] = {}

    def score(w: dict[str, float], **options) -> dict[str, float]:
        options = {**method_options, **options}
        key = (tuple(sorted((k, round(float(v), 10)) for k, v in w.items())),
               tuple(sorted(options.items())))  # fmt: skip
        if key in scored:
            return {**scored[key], "merge_s": 0.0, "eval_s": 0.0}
        t0 = time.perf_counter()
        merger.set_merge(method, w, **options)
        _sync(merger.model)
        t1 = time.perf_counter()
        result = validation_objective(merger.model, tokenizer, sources, metric=metric,
                                      max_examples=max_examples, batch_size=batch_size)  # fmt: skip
        result.update({"merge_s": t1 - t0, "eval_s": time.perf_counter() - t1})
        scored[key] = result
        return dict(result)

    return score


def validation_objective(
    model, tokenizer, sources: Sequence, *, metric: str, max_examples: int | None, batch_size: int
) -> dict[str, float]:
    """A model's search objective: ``metric`` on validation, the mean over sources, and each
    source's value (``"accuracy/facts"``) — what every search of every method is chosen by."""
    from dem.evaluation.evaluate import evaluate

    table = evaluate(model, tokenizer, list(sources), "validation", metrics=(metric,),
                     max_examples=max_examples, batch_size=batch_size)  # fmt: skip
    values = table[table["metric"] == metric].set_index("source")["value"]
    return {"objective": float(values.mean()),
            **{f"{metric}/{s}": float(v) for s, v in values.items()}}  # fmt: skip


def _sync(model: torch.nn.Module) -> None:
    # CUDA kernels are asynchronous: without a sync the merge time would be charged to eval.
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
