"""Merge methods, one record each: formula, declared parameters, and a function on vectors.

Notation (DEM.md): θ0 = the base, θ_i = the fine-tunes, v_i = θ_i − θ0 their distribution
vectors, w_i = one weight per model. A method's function maps the v_i of one tensor (or of a
span of it) to the merged vector τ, and every merge is θ = θ0 + τ (:meth:`Method.merge`, the one
place θ0 meets τ). The streaming merge (:mod:`dem.merge`), the in-memory search
(:mod:`dem.search`) and ``dem merge``'s options and help all read these records, so adding a
method is one :class:`Method` in :data:`METHODS` (plus its test).

TIES and DARE are built, as in peft's ``merge_utils``, from small steps on vectors: :func:`trim`
(keep the largest entries), :func:`ties_delta` (elect a sign, disjoint mean) and :func:`dare`
(drop at random, rescale). torch is imported inside the functions that need it: the command line
reads these records to build its options and must not pay seconds for torch to print ``--help``.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dem import DemError

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
            value = self.kind(value)
        except (ValueError, OverflowError):  # int(nan), int(inf)
            raise ParameterError(self.name, f"{value!r} is not a whole number") from None
        if not self.valid(value):
            raise ParameterError(self.name, f"{value} must be {self.valid_text}")
        return value


DENSITY = Param("density", 0.2, "TIES: fraction of each vector's largest-magnitude entries kept",
                valid=lambda x: 0 < x <= 1, valid_text="in (0, 1]", metavar="K")  # fmt: skip
# DARE paper: p = 0.9 keeps quality for fine-tuned LLM deltas
DROP_PROB = Param("drop_prob", 0.9, "DARE: probability of dropping each entry; survivors are "
                  "scaled by 1/(1-P)", valid=lambda p: 0 <= p < 1, valid_text="in [0, 1)",
                  metavar="P")  # fmt: skip
# λ = 1 scales nothing, so passing it to a method without λ is accepted (and ignored)
LAM = Param("lam", 1.0, "scale λ of the merged vector", valid=math.isfinite,
            valid_text="a finite number", key="lambda", metavar="L",
            harmless=lambda lam: lam == 1.0)  # fmt: skip
# a seed means nothing to a method that draws nothing: accepted by every method
SEED = Param("seed", 0, "DARE seed; masks depend on the seed and the tensor name only",
             kind=int, metavar="S", harmless=lambda seed: True)  # fmt: skip


# --- the steps methods are built from ------------------------------------------------------------
def weighted_sum(
    xs: Iterable[Tensor],
    w: Sequence[float],
    *,
    acc: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Σ_i w_i·x_i accumulated left to right, taking one x_i at a time.

    With ``acc`` the sum is added onto it in place (acc + w_1·x_1 + …); otherwise it starts as
    w_1·x_1, written into ``out`` when given (scratch memory reused across tensors). The two
    orders round differently in the last bit, and each caller keeps the one it always had.
    """
    import torch

    for x, w_i in zip(xs, w, strict=True):
        if acc is None:
            acc = x * w_i if out is None else torch.mul(x, w_i, out=out)
        else:
            acc.add_(x, alpha=w_i)
    return acc


def trim(v: Tensor, density: float) -> Tensor:
    """TIES trim: keep the round(density · numel) entries of largest |v|, zero the rest."""
    import torch

    k = round(density * v.numel())
    if k >= v.numel():
        return v.clone()
    out = torch.zeros_like(v)
    if k > 0:
        keep = torch.topk(v.abs().flatten(), k, sorted=False).indices
        out.view(-1)[keep] = v.view(-1)[keep]
    return out


def ties_delta(vectors: Iterable[Tensor], w: Sequence[float], density: float) -> Tensor:
    """TIES (Yadav et al. 2023) on distribution vectors, before scaling by λ.

    τ̂_i = trim(v_i, k); elected sign γ = sgn(Σ_i w_i τ̂_i) (sign of the total mass);
    disjoint mean τ = Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i over A = {i : sgn(τ̂_i) = γ}, entrywise
    (entries no model keeps stay 0). With w_i = 1 this is the paper's unweighted mean.
    """
    import torch

    trimmed = torch.stack([trim(v, density) for v in vectors])
    weights = trimmed.new_tensor(w).view(-1, *[1] * (trimmed.dim() - 1))
    weighted = trimmed * weights
    sign = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (sign != 0)
    mass = torch.where(agree, weighted, 0).sum(dim=0)
    count = torch.where(agree, weights, 0).sum(dim=0)
    return mass / torch.where(count == 0, 1, count)


def dare(v: Tensor, drop_prob: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p, rescale survivors by 1/(1 − p).

    Entry j survives when u_j ≥ p for u_j ~ U[0, 1) drawn from ``generator`` (in place on v).
    """
    import torch

    # drawn in float32 on the CPU whatever v's dtype and device, so float32 and float64 merges,
    # on any device, drop the same entries
    u = torch.rand(v.shape, generator=generator)
    keep = (u >= drop_prob).to(device=v.device, dtype=v.dtype)
    return v.mul_(keep).div_(1 - drop_prob)


def tensor_seed(seed: int, name: str) -> int:
    """Seed for one tensor's DARE masks: a hash of (seed, tensor name), not of the tensor's
    position, so the result does not depend on the order tensors are stored or processed in."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --- the methods' functions: (xs, w, params, generator, *, acc, out) -> τ (acc + τ with acc) ------
def _weighted(xs, w, p, generator, *, acc=None, out=None):
    # λ·w_i with λ = 1 is w_i exactly, so dem and linear share task arithmetic's function
    return weighted_sum(xs, [p.get("lam", 1.0) * w_i for w_i in w], acc=acc, out=out)


def _ties(xs, w, p, generator, *, acc=None, out=None):
    tau = p["lam"] * ties_delta(xs, w, p["density"])
    return tau if acc is None else acc.add_(tau)


def _dare_linear(xs, w, p, generator, *, acc=None, out=None):
    dropped = (dare(x, p["drop_prob"], generator) for x in xs)  # masks drawn for v_1, v_2, …
    return weighted_sum(dropped, w, acc=acc, out=out)


def _dare_ties(xs, w, p, generator, *, acc=None, out=None):
    return _ties([dare(x, p["drop_prob"], generator) for x in xs], w, p, generator, acc=acc)


@dataclass(frozen=True)
class Method:
    """One merge method: what it computes, what it takes, and how it may be streamed."""

    name: str
    formula: str  # one line, in the notation above
    fn: Callable[..., Tensor]  # (xs, w, params, generator, *, acc=None, out=None) -> τ
    params: tuple[Param, ...] = ()
    about: str = ""  # where it comes from, for --help
    # any span of a tensor merges on its own: the streaming merge works in chunks
    elementwise: bool = False
    # takes the vectors one at a time: the streaming merge holds 3 tensors, not one per model
    one_at_a_time: bool = False
    # writes into the vectors it is given (DARE drops in place): callers hand it copies
    overwrites: bool = False
    # a function of the models θ_i rather than of v_i (a model soup has no base): given θ_i,
    # it returns θ itself
    on_models: bool = False

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def random(self) -> bool:
        """Draws random numbers: one generator per tensor, seeded by :func:`tensor_seed`."""
        return "seed" in self.param_names

    def merge(self, theta_base, xs, w, params, generator=None, *, out=None, onto_base=False):
        """θ of one tensor (or span): θ0 + τ, τ = this method on ``xs`` (v_i, or θ_i when
        :attr:`on_models`). ``onto_base`` accumulates τ onto a copy of θ0 instead of adding
        θ0 at the end: the in-memory search's order, which rounds differently in the last bit.
        """
        if self.on_models:
            return self.fn(xs, w, params, generator, out=out)
        if onto_base:
            return self.fn(xs, w, params, generator, acc=theta_base.clone())
        return self.fn(xs, w, params, generator, out=out).add_(theta_base)

    def __call__(self, theta_base: Tensor, thetas: Sequence[Tensor], w: Sequence[float], *,
                 name: str = "", generator=None, **params) -> Tensor:  # fmt: skip
        """θ of one tensor from θ0 and the θ_i in memory, with the parameters, checks and DARE
        seeding (from ``seed`` and the tensor ``name``) of :func:`dem.merge.merge`."""
        p = resolve_params(self, params)
        w = check_weights(w)
        if generator is None:
            generator = tensor_generator(self, p, name)
        if self.on_models:
            xs = [t.clone() for t in thetas] if self.overwrites else list(thetas)
        else:
            xs = [theta - theta_base for theta in thetas]
        return self.merge(theta_base, xs, w, p, generator)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dem", "θ = θ0 + Σ_i w_i·v_i", _weighted, about="DEM, Ram et al. 2024; the default",
           elementwise=True, one_at_a_time=True),
    Method("linear", "θ = Σ_i w_i·θ_i", _weighted, about="model soup, Wortsman et al. 2022: "
           "w_i = 1/n", elementwise=True, one_at_a_time=True, on_models=True),
    Method("task_arithmetic", "θ = θ0 + λ·Σ_i w_i·v_i", _weighted, (LAM,),
           about="Ilharco et al. 2023", elementwise=True, one_at_a_time=True),
    Method("ties", "θ = θ0 + λ·TIES(v; w, density)", _ties, (LAM, DENSITY),
           about="Yadav et al. 2023"),
    # DARE's masks are drawn per whole tensor, to be independent of any chunk size
    Method("dare_linear", "θ = θ0 + Σ_i w_i·DARE(v_i; p)", _dare_linear, (DROP_PROB, SEED),
           about="Yu et al. 2024", one_at_a_time=True, overwrites=True),
    # density 1: nothing trimmed by magnitude, as in mergekit's dare_ties
    Method("dare_ties", "θ = θ0 + λ·TIES(DARE(v; p); w, density)", _dare_ties,
           (LAM, replace(DENSITY, default=1.0), DROP_PROB, SEED), about="Yu et al. 2024",
           overwrites=True),
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
    return {
        p.name: p.check(p.default if given.get(p.name) is None else given[p.name])
        for p in method.params
    }


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
