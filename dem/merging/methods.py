"""Merge methods, one record each: formula, declared parameters, and a function on vectors.

Notation: θ0 = the base, θ_i = the fine-tunes, v_i = θ_i − θ0 their distribution vectors, w_i =
one weight per model, λ = a scale. Each record's function maps one block of rows of θ0 and of
the v_i (θ_i for a method on models) to the merged θ; a method that needs a statistic of the
whole tensor (a magnitude threshold, a cosine) declares ``stats``, a first pass over the
blocks. The streaming merge (:mod:`dem.merging.merge`), the in-memory search (:mod:`dem.search.weights`) and
``dem merge``'s options and help all read these records, so adding a method is one
:class:`Method` in :data:`METHODS` (plus its test). The steps live in :mod:`dem.merging.steps`.

Deterministic methods agree with mergekit 0.1.5 within 1e-6 given the same parameters
(``benchmarks/check_merge_exact.py``); each record's ``notes`` say where a method departs from
its paper or from mergekit. torch is imported inside functions: the command line reads these
records to build its options and must not pay seconds for torch to print ``--help``.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dem import DemError
from dem.merging import steps as S

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor


class ParameterError(DemError):
    """A merge parameter out of range, or given to a method that has no such parameter.

    The message names the parameter as the library spells it (``density``); ``parameter`` and
    ``problem`` let the command line say the same about its flag (``--density``).
    """

    def __init__(self, parameter: str, problem: str) -> None:
        super().__init__(f"{parameter} {problem}")
        self.parameter, self.problem = parameter, problem


@dataclass(frozen=True)
class Param:
    """One declared parameter of a merge method: its keyword, default and valid values."""

    name: str  # the keyword of merge() and InMemoryMerge.apply_method()
    default: Any
    doc: str  # one line, for --help
    kind: type = float
    valid: Callable[[Any], bool] = lambda value: True
    valid_text: str = ""  # what `valid` accepts, after "must be": "in (0, 1]"
    key: str = ""  # its name in --config files and on the command line, when not `name`
    metavar: str = "X"
    harmless: Callable[[Any], bool] = lambda value: False  # may go to methods without it

    @property
    def config_key(self) -> str:
        return self.key or self.name

    def check(self, value: Any) -> Any:
        """``value`` as ``kind``, or :class:`ParameterError` naming this parameter."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ParameterError(self.name, f"{value!r} is not a number")
        try:
            converted = self.kind(value)
        except (ValueError, OverflowError):  # int(nan), int(inf)
            converted = None
        if converted is None or converted != value:  # int(1.5) is 1: refused, not truncated
            raise ParameterError(self.name, f"{value!r} is not a whole number")
        value = converted
        if not self.valid(value):
            raise ParameterError(self.name, f"{value} must be {self.valid_text}")
        return value


DENSITY = Param("density", 0.2, "TIES: fraction of each vector's largest-magnitude entries kept",
                valid=lambda x: 0 < x <= 1, valid_text="in (0, 1]", metavar="K")  # fmt: skip
# DARE paper: p = 0.9 keeps quality for fine-tuned LLM deltas
DROP_PROB = Param("drop_prob", 0.9, "DARE: probability of dropping each entry; survivors are "
                  "scaled by 1/(1-P)", valid=lambda p: 0 <= p < 1, valid_text="in [0, 1)",
                  metavar="P")  # fmt: skip
GAMMA = Param("gamma", 0.01, "Breadcrumbs: fraction of largest-magnitude entries dropped as "
              "outliers", valid=lambda g: 0 <= g < 1, valid_text="in [0, 1)", metavar="G")  # fmt: skip
EPSILON = Param("epsilon", 0.15, "DELLA: keep probabilities run from density-E (smallest entry of a "
                "row) to density+E (largest)", valid=lambda e: 0 <= e < 0.5,
                valid_text="in [0, 0.5)", metavar="E")  # fmt: skip
# λ = 1 scales nothing, so passing it to a method without λ is accepted (and ignored)
LAM = Param("lam", 1.0, "scale λ of the merged vector", valid=math.isfinite,
            valid_text="a finite number", key="lambda", metavar="L",
            harmless=lambda lam: lam == 1.0)  # fmt: skip
# a seed means nothing to a method that draws nothing: accepted by every method
SEED = Param("seed", 0, "DARE/DELLA seed; masks depend on the seed and the tensor name only",
             kind=int, metavar="S", harmless=lambda seed: True)  # fmt: skip


def tensor_seed(seed: int, name: str) -> int:
    """Seed for one tensor's random masks: a hash of (seed, tensor name), not of the tensor's
    position, so the result does not depend on the order tensors are stored or processed in."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --- the methods: (θ0, xs, w, params, state) -> θ of one block; xs are v_i (θ_i on models) -------
def _weighted(theta0, xs, w, p, s):
    # λ·w_i with λ = 1 is w_i exactly, so dem shares task arithmetic's function
    scaled = [p.get("lam", 1.0) * w_i for w_i in w]
    if s.onto_base:  # the in-memory search's order: θ0 + w_1·v_1 + …
        return S.weighted_sum(xs, scaled, acc=theta0.clone())
    return S.weighted_sum(xs, scaled, out=s.out).add_(theta0)


def _linear(theta0, xs, w, p, s):
    return S.weighted_sum(xs, w, out=s.out)


def _dare_linear(theta0, xs, w, p, s):
    dropped = (S.dare(x, p["drop_prob"], s.generator(i)) for i, x in enumerate(xs))
    return S.weighted_sum(dropped, w, out=s.out).add_(theta0)


def _dropped(xs, p, s) -> list:
    """The v_i after the method's random drop (none, DARE or DELLA's MagPrune)."""
    if "drop_prob" in p:
        return [S.dare(x, p["drop_prob"], s.generator(i)) for i, x in enumerate(xs)]
    if "epsilon" in p:
        return [S.magprune(x, p["density"], p["epsilon"], s.generator(i)) for i, x in enumerate(xs)]
    return list(xs)


def _bands(band: Callable) -> Callable:
    """A first pass finding each model's magnitude band (after its random drop) exactly."""

    def stats(passes, w, p, s):
        bands = [band(s.numel, p) for _ in w]
        S.find_bands(lambda: (_dropped(xs, p, s) for _, xs in passes()), bands)
        return bands

    return stats


def _top(numel, p):
    return S.top_band(numel, p["density"])


def _outliers(numel, p):
    return S.outlier_band(numel, p["density"], p["gamma"])


def _kept(xs, p, s) -> list:
    return [S.keep_band(v, band) for v, band in zip(_dropped(xs, p, s), s.stats, strict=True)]


def _ties(theta0, xs, w, p, s):  # also DARE-TIES (a drop first) and DELLA (MagPrune first)
    vs = _kept(xs, p, s) if s.stats else _dropped(xs, p, s)
    return S.consensus(vs, w, normalize=True).mul_(p["lam"]).add_(theta0)


def _breadcrumbs(theta0, xs, w, p, s):
    return S.weighted_sum(_kept(xs, p, s), w).mul_(p["lam"]).add_(theta0)


def _breadcrumbs_ties(theta0, xs, w, p, s):
    return S.consensus(_kept(xs, p, s), w, normalize=False).mul_(p["lam"]).add_(theta0)


def _della_linear(theta0, xs, w, p, s):
    return S.weighted_sum(_dropped(xs, p, s), w).mul_(p["lam"]).add_(theta0)


def _stock_ratio(passes, w, p, s):
    return S.stock_ratio(S.gram(lambda: (xs for _, xs in passes())))


def _model_stock(theta0, xs, w, p, s):
    return S.weighted_sum(xs, [s.stats * w_i for w_i in w], out=s.out).add_(theta0)


def _slerp_coefficients(passes, w, p, s):
    return S.slerp_coefficients(S.gram(lambda: ([t0, *xs] for t0, xs in passes())), w[0])


def _slerp(theta0, xs, w, p, s):
    a, b = s.stats
    return S.weighted_sum([theta0, *xs], [a, b], out=s.out)


def _della_check(p: Mapping[str, Any]) -> None:
    if 0 < p["density"] - p["epsilon"] and p["density"] + p["epsilon"] < 1:
        return
    raise ParameterError("epsilon", f"{p['epsilon']} must leave density ± epsilon inside (0, 1) "
                         f"(density is {p['density']})")  # fmt: skip


@dataclass(frozen=True)
class Method:
    """One merge method: what it computes, what it takes, and how it streams."""

    name: str
    formula: str  # one line, in the notation above
    fn: Callable[..., Tensor]  # (θ0, xs, w, params, state) -> θ of one block of rows
    params: tuple[Param, ...] = ()
    about: str = ""  # where it comes from, for --help
    notes: str = ""  # where it departs from its paper or from mergekit
    # a first pass over the tensor's blocks for a whole-tensor statistic: (passes, w, params,
    # state) -> state.stats; passes() yields (θ0, [x_i]) block by block
    stats: Callable[..., Any] | None = None
    # takes the vectors one at a time: the streaming merge holds one scratch block, not one per model
    one_at_a_time: bool = False
    # a function of the models θ_i rather than of v_i (a model soup has no base)
    on_models: bool = False
    overwrites: bool = False  # writes into its inputs (none does: callers need not copy them)
    models: tuple[int, int | None] = (1, None)  # how many models it takes, at least and at most
    check: Callable[[Mapping[str, Any]], None] | None = None  # constraints between parameters
    own_scale: bool = False  # chooses its scale itself (Model Stock, from the vectors' angles)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def shared_scale(self) -> str | None:
        """Where one scale λ shared by every source goes: ``"lam"``, the method's own scale, for
        the methods that have one (TIES and DELLA divide by Σ w_i, so equal weights of any size
        give one model); ``"weights"``, every w_i = λ, for the weighted sums (DEM, DARE); None
        for a method that sets its scale itself."""
        if "lam" in self.param_names:
            return "lam"
        return None if self.own_scale else "weights"

    @property
    def random(self) -> bool:
        """Draws random numbers: one generator per tensor, seeded by :func:`tensor_seed`."""
        return "seed" in self.param_names

    @property
    def streams(self) -> str:
        """How the streaming merge runs it (the tensor is always read in blocks of rows)."""
        return "in one pass" if self.stats is None else "after a statistics pass"

    def check_models(self, n: int) -> None:
        low, high = self.models
        if n < low or (high is not None and n > high):
            wanted = f"exactly {low}" if low == high else f"at least {low}"
            raise DemError(
                f"method {self.name!r} takes {wanted} model(s) besides the base, got {n}"
            )

    def merge(self, theta_base, xs, w, params, generator=None, *, out=None, onto_base=False):
        """θ of one whole tensor from θ0 and the ``xs`` (v_i, or θ_i when :attr:`on_models`).

        ``onto_base`` accumulates a weighted sum onto a copy of θ0 instead of adding θ0 at the
        end: the in-memory search's order, which rounds differently in the last bit.
        """
        theta0, xs = S.as_rows(theta_base), [S.as_rows(x) for x in xs]
        rows_out = None if out is None else S.as_rows(out)
        state = S.TensorState(theta0.numel(), len(xs), generator, out=rows_out, onto_base=onto_base)
        if self.stats is not None:

            def passes():
                state.new_pass()
                yield theta0, xs

            state.stats = self.stats(passes, w, params, state)
        state.new_pass()
        return self.fn(theta0, xs, w, params, state).reshape(theta_base.shape)

    def __call__(self, theta_base: Tensor, thetas: Sequence[Tensor], w: Sequence[float], *,
                 name: str = "", generator=None, **params) -> Tensor:  # fmt: skip
        """θ of one tensor from θ0 and the θ_i in memory, with the parameters, checks and
        seeding (from ``seed`` and the tensor ``name``) of :func:`dem.merging.merge.merge`."""
        self.check_models(len(thetas))
        p = resolve_params(self, params)
        w = check_weights(w)
        if generator is None:
            generator = tensor_generator(self, p, name)
        xs = list(thetas) if self.on_models else [theta - theta_base for theta in thetas]
        return self.merge(theta_base, xs, w, p, generator)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dem", "θ = θ0 + Σ_i w_i·v_i", _weighted, about="DEM, Ram et al. 2024; the default",
           one_at_a_time=True),
    Method("linear", "θ = Σ_i w_i·θ_i", _linear, about="model soup, Wortsman et al. 2022: "
           "w_i = 1/n", one_at_a_time=True, on_models=True,
           notes="weights are not normalized (mergekit's linear divides by Σ w_i by default)"),
    Method("task_arithmetic", "θ = θ0 + λ·Σ_i w_i·v_i", _weighted, (LAM,),
           about="Ilharco et al. 2023", one_at_a_time=True),
    Method("ties", "θ = θ0 + λ·Σ_{i∈A} w_i·τ_i / Σ_{i∈A} w_i, τ_i = top_k(v_i)", _ties,
           (LAM, DENSITY), about="Yadav et al. 2023", stats=_bands(_top),
           notes="τ_i keeps the k = max(1, int(density·numel)) largest |v_i| (ties: earlier "
           "entry first); A = {i : sgn(w_i·τ_i) = γ}, γ = +1 where Σ w_i·τ_i ≥ 0 else −1; an "
           "entry no model keeps stays θ0. As mergekit's ties; the paper's when all w_i = 1; "
           "peft divides by |A|, not Σ w_i"),
    Method("dare_linear", "θ = θ0 + Σ_i w_i·DARE(v_i; p)", _dare_linear, (DROP_PROB, SEED),
           about="Yu et al. 2024", one_at_a_time=True,
           notes="DARE keeps entries with u ≥ p and rescales them by 1/(1 − p), as the paper; "
           "mergekit rescales to the L1 norm of v_i instead"),
    # density 1: nothing trimmed by magnitude, as in mergekit's dare_ties
    Method("dare_ties", "θ = θ0 + λ·TIES(DARE(v; p); w, density)", _ties,
           (LAM, replace(DENSITY, default=1.0), DROP_PROB, SEED), about="Yu et al. 2024",
           stats=_bands(_top), notes="normalized like ties (mergekit's dare_ties is not by "
           "default) and DARE's 1/(1 − p) rescaling (mergekit: L1 norm)"),
    Method("breadcrumbs", "θ = θ0 + λ·Σ_i w_i·band(v_i)", _breadcrumbs,
           (LAM, replace(DENSITY, default=0.9), GAMMA), about="Davari & Belilovsky 2023",
           stats=_bands(_outliers),
           notes="band(v) drops the int(γ·numel) largest |v| of the tensor and keeps the next "
           "int(density·numel) (fewer dropped if fewer remain), as mergekit's breadcrumbs"),
    Method("breadcrumbs_ties", "θ = θ0 + λ·Σ_{i∈A} w_i·band(v_i)", _breadcrumbs_ties,
           (LAM, replace(DENSITY, default=0.9), GAMMA), about="Davari & Belilovsky 2023, with "
           "TIES's sign election", stats=_bands(_outliers),
           notes="A as in ties; not divided by Σ_{i∈A} w_i, as mergekit's breadcrumbs_ties"),
    Method("della", "θ = θ0 + λ·Σ_{i∈A} w_i·M(v_i) / Σ_{i∈A} w_i, M = MagPrune", _ties,
           (LAM, replace(DENSITY, default=0.5), EPSILON, SEED), about="Deep et al. 2024",
           check=_della_check,
           notes="M keeps an entry with p from density − ε to density + ε by its magnitude rank in "
           "its row and rescales it by 1/p, as the paper; mergekit rescales to the L1 norm"),
    Method("della_linear", "θ = θ0 + λ·Σ_i w_i·M(v_i)", _della_linear,
           (LAM, replace(DENSITY, default=0.5), EPSILON, SEED), about="Deep et al. 2024, "
           "without sign election", check=_della_check, notes="M as in della"),
    Method("model_stock", "θ = θ0 + t·Σ_i w_i·v_i, t = N·cos/(1 + (N − 1)·cos)", _model_stock,
           about="Jang et al. 2024", stats=_stock_ratio, one_at_a_time=True, models=(2, None),
           own_scale=True,
           notes="cos is the mean pairwise cosine of the whole-tensor v_i; the paper and "
           "mergekit take w_i = 1/N (pass it); t = 0 where 1 + (N − 1)·cos is below 1e-6"),
    Method("slerp", "θ = slerp(θ0, θ_1; t = w_1)", _slerp, about="Shoemake 1985, per tensor",
           stats=_slerp_coefficients, on_models=True, models=(1, 1),
           notes="the model's weight is mergekit's t; linear where |cos Ω| > 0.9995, as mergekit"),
)}  # fmt: skip


def _declared() -> dict[str, Param]:
    """Every parameter some method declares, in first-declared order (a name's first record)."""
    params: dict[str, Param] = {}
    for method in METHODS.values():
        for param in method.params:
            params.setdefault(param.name, param)
    return params


PARAMS = _declared()  # the command line's options and the config's keys


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise DemError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def resolve_params(method: Method, given: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of one merge: every one ``method`` declares, given or default, checked.

    ``None`` means not given. A parameter the method does not take is an error, unless its
    value would change nothing (λ = 1, any seed).
    """
    unknown = sorted(set(given) - set(PARAMS))
    if unknown:
        raise DemError(f"unknown merge parameter {unknown[0]!r}; known: {', '.join(PARAMS)}")
    for param in PARAMS.values():
        value = given.get(param.name)
        if value is not None and param.name not in method.param_names and not param.harmless(value):
            users = sorted(m.name for m in METHODS.values() if param.name in m.param_names)
            raise ParameterError(param.name, f"does not apply to method {method.name!r} "
                                 f"(only to {', '.join(users)})")  # fmt: skip
    params = {
        p.name: p.check(p.default if given.get(p.name) is None else given[p.name])
        for p in method.params
    }
    if method.check is not None:
        method.check(params)
    return params


def check_weights(w: Sequence[float], names: Sequence[str] | None = None) -> list[float]:
    """Merge weights as floats; each must be a finite number (``names`` say whose it is)."""
    if not len(w):
        raise DemError("no models given: a merge needs at least one model and its weight")
    names = names or [f"model {i + 1}" for i in range(len(w))]
    out = []
    for value, what in zip(w, names, strict=True):
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise DemError(f"{what}: weight {value!r} is not a finite number")
        out.append(float(value))
    return out


def tensor_generator(method: Method, params: Mapping[str, Any], name: str):
    """The generator for one tensor of a random method (None for the others)."""
    if not method.random:
        return None
    import torch

    return torch.Generator().manual_seed(tensor_seed(params["seed"], name))
