"""The steps merge methods are built from, on blocks of rows of distribution vectors.

A tensor reaches a method as consecutive blocks of whole rows (the streaming merge) or as one
block (the in-memory search), always as a 2-D ``(rows, columns)`` view. Steps that need a
statistic of the whole tensor (a magnitude threshold, a norm, a cosine) get it from a first pass
over the blocks (:func:`find_bands`, :func:`gram`), so every method streams, whatever the
tensor's size, and gives the same bits streamed or in memory.

Conventions shared with mergekit and peft, so results can be checked against them: a density
keeps ``int(density · numel)`` entries; TIES elects the sign of the weighted sum (``>= 0`` is +)
and keeps entries whose weighted sign agrees. Where they leave a choice open, dem fixes it:
among entries of equal magnitude the earlier one (row-major order) ranks as the larger.
torch is imported inside functions: ``dem merge --help`` reads the method records without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    Tensor = torch.Tensor


def weighted_sum(xs: Iterable[Tensor], w: Sequence[float], *, acc=None, out=None) -> Tensor:
    """Σ_i w_i·x_i accumulated left to right, taking one x_i at a time.

    With ``acc`` the sum is added onto it in place (acc + w_1·x_1 + …); otherwise it starts as
    w_1·x_1, written into ``out`` when given (scratch memory reused across tensors).
    """
    import torch

    for x, w_i in zip(xs, w, strict=True):
        if acc is None:
            acc = x * w_i if out is None else torch.mul(x, w_i, out=out)
        else:
            acc.add_(x, alpha=w_i)
    return acc


def as_rows(t: Tensor) -> Tensor:
    """A tensor as the 2-D (rows, columns) view the methods work on: rows are its first
    dimension; a vector or a scalar is one row."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


class TensorState:
    """One tensor's merge in progress: what its first pass found, and what a pass carries from
    block to block (each model's random generator, the rank counters of magnitude bands)."""

    def __init__(self, numel: int, n_models: int, generator=None, *, out=None, onto_base=False):
        self.numel, self.out, self.onto_base = numel, out, onto_base
        # one generator per model, so a block draws what the whole tensor would (row-major)
        self.seeds = model_seeds(generator, n_models) if generator is not None else None
        self.stats: Any = None
        self._generators: list = []

    def new_pass(self) -> None:
        """Restart every model's random draws: each pass over the blocks sees the same masks."""
        import torch

        self._generators = [torch.Generator().manual_seed(s) for s in self.seeds or ()]

    def generator(self, i: int):
        return self._generators[i]


# --- keeping entries by magnitude rank, exactly, over blocks ---------------------------------------
@dataclass
class Band:
    """Keep the entries of one vector whose magnitude rank is in ``[start, stop)``.

    Rank 0 is the largest |x|; equal magnitudes rank in row-major order. ``hi`` is the magnitude
    at rank ``start`` and ``lo`` the one at rank ``stop − 1`` (found by :func:`find_bands`), with
    ``above_*`` the number of entries strictly larger; ``seen_*`` count the entries equal to
    them met so far, which decides the ties as the blocks go by in order.
    """

    start: int
    stop: int
    numel: int
    hi: Tensor | None = None
    above_hi: int = 0
    equal_hi: int = 0
    seen_hi: int = 0
    lo: Tensor | None = None
    above_lo: int = 0
    equal_lo: int = 0
    seen_lo: int = 0

    @property
    def keeps_all(self) -> bool:
        return self.start == 0 and self.stop >= self.numel

    def queries(self) -> list[int]:
        """The ranks whose magnitudes must be found."""
        if self.keeps_all or self.stop <= self.start:
            return []
        return [r for r, needed in ((self.start, self.start > 0),
                                    (self.stop - 1, self.stop < self.numel)) if needed]  # fmt: skip


def top_band(numel: int, density: float) -> Band:
    """TIES's trim: the k = max(1, int(density·numel)) largest entries (all when density ≥ 1)."""
    k = numel if density >= 1 else max(1, int(density * numel))
    return Band(0, min(k, numel), numel)


def outlier_band(numel: int, density: float, gamma: float) -> Band:
    """Model Breadcrumbs: drop the int(γ·numel) largest, keep the next int(density·numel); the
    dropped outliers shrink when fewer than that many entries remain (as mergekit does)."""
    if density >= 1:
        return Band(0, numel, numel)
    keep, top = int(density * numel), int(gamma * numel)
    start = min(top, numel - keep)
    return Band(start, start + keep, numel)


def _levels(dtype) -> tuple[object, list[tuple[int, int]]]:
    """|x|'s bits as a non-negative integer (ordered like the magnitudes), read 15-16 bits at a
    time from the top: two passes for float32, four for float64."""
    import torch

    if dtype == torch.float64:
        return torch.int64, [(48, 15), (32, 16), (16, 16), (0, 16)]
    return torch.int32, [(16, 15), (0, 16)]


def find_bands(passes: Callable[[], Iterator[list[Tensor]]], bands: list[Band]) -> None:
    """Fill in each band's magnitude thresholds exactly, by radix selection over the blocks.

    ``passes()`` runs one pass: for each block, one tensor per band (the vectors it selects
    from). Each pass histograms the next bits of |x| among the entries still candidates, so
    memory is a few histograms, never the tensor (``torch.kthvalue`` would need it whole).
    """
    import torch

    # one query per (band, rank): [band index, rank, prefix, entries below it, entries equal]
    queries = [[i, r, 0, 0, 0] for i, b in enumerate(bands) for r in b.queries()]
    if not queries:
        return
    int_dtype, levels, depth = None, [(0, 0)], 0
    while depth < len(levels):
        hists: dict[tuple[int, int], Tensor] = {}
        for xs in passes():
            if int_dtype is None:
                int_dtype, levels = _levels(xs[0].dtype)
            shift, width = levels[depth]
            for i, x in enumerate(xs):
                prefixes = {q[2] for q in queries if q[0] == i}  # queries may share a bin
                if not prefixes:
                    continue
                bits = x.abs().view(int_dtype).reshape(-1)
                for prefix in prefixes:
                    key = bits if depth == 0 else bits[(bits >> (shift + width)) == prefix]
                    key = key >> shift if depth == 0 else (key >> shift) & ((1 << width) - 1)
                    counts = torch.bincount(key, minlength=1 << width).cpu()
                    old = hists.get((i, prefix))
                    hists[i, prefix] = counts if old is None else old + counts
        shift, width = levels[depth]
        for q in queries:  # the bin holding each rank, counted from the smallest magnitude
            counts = hists[q[0], q[2]]
            cum = counts.cumsum(0)
            position = bands[q[0]].numel - 1 - q[1] - q[3]
            b = int(torch.searchsorted(cum, position, right=True))
            q[3] += int(cum[b - 1]) if b else 0
            q[2], q[4] = (q[2] << width) | b, int(counts[b])
        depth += 1
    for i, rank, bits, below, equal in queries:
        band = bands[i]
        value = torch.tensor([bits], dtype=int_dtype).view(_float(int_dtype))[0]
        if rank == band.start and band.start > 0:
            band.hi, band.above_hi, band.equal_hi = value, band.numel - below - equal, equal
        if rank == band.stop - 1 and band.stop < band.numel:
            band.lo, band.above_lo, band.equal_lo = value, band.numel - below - equal, equal


def _float(int_dtype):
    import torch

    return torch.float64 if int_dtype == torch.int64 else torch.float32


def keep_band(x: Tensor, band: Band) -> Tensor:
    """x with the entries outside ``band`` set to 0; blocks must come in order.

    Two float thresholds on |x| do the work. Only where a cut splits a group of equal
    magnitudes are the block's entries of that magnitude looked up and kept or dropped by
    their order (zeros may go either way: a kept 0 changes nothing).
    """
    import torch
    from torch.nn.functional import threshold

    if band.keeps_all:
        return x
    if band.stop <= band.start:
        return torch.zeros_like(x)
    a = x.abs()
    ties = []  # (magnitude, first tie rank kept, rank after the last, counter name)
    if band.lo is not None:  # keep |x| > lo, and the first `inside` entries equal to it
        inside = band.stop - band.above_lo
        if band.lo == 0 or inside <= 0:
            a = threshold(a, float(band.lo), 0.0)
        elif inside >= band.equal_lo:
            a = threshold(a, float(torch.nextafter(band.lo, band.lo.new_zeros(()))), 0.0)
        else:
            a = threshold(a, float(band.lo), 0.0)
            ties.append((band.lo, 0, inside, "seen_lo"))
    if band.hi is not None:  # keep |x| < hi, and the entries equal to it after the first `out`
        out = band.start - band.above_hi
        top = torch.nextafter(band.hi, band.hi.new_full((), math.inf))
        cut = band.hi if out >= band.equal_hi or band.hi == 0 else top if out <= 0 else band.hi
        a = threshold(a.neg_(), -float(cut), 0.0).neg_()  # −threshold(−|x|) cuts from above
        if 0 < out < band.equal_hi and band.hi != 0:
            ties.append((band.hi, out, band.equal_hi, "seen_hi"))
    kept = torch.copysign(a, x)
    if len(ties) == 2 and bool(ties[0][0] == ties[1][0]):  # one group split at both ends
        ties = [(ties[0][0], ties[1][1], ties[0][2], "seen_lo")]
    for value, first, last, counter in ties:
        flat_x, flat_kept = x.reshape(-1), kept.view(-1)
        where = (flat_x.abs() == value).nonzero().squeeze(1)
        seen = getattr(band, counter)
        rank = torch.arange(seen, seen + len(where), device=x.device)
        setattr(band, counter, seen + len(where))
        take = where[(rank >= first) & (rank < last)]
        flat_kept[take] = flat_x[take]
    return kept


# --- random drops: drawn row-major from one generator per model, so blocks draw what the whole would
def dare(v: Tensor, drop_prob: float, generator) -> Tensor:
    """DARE (Yu et al. 2024): entry j survives when u_j ≥ p, u_j ~ U[0, 1); survivors × 1/(1 − p)."""
    import torch

    # drawn in float32 on the CPU whatever v's dtype and device, so float32 and float64 merges,
    # on any device, drop the same entries
    u = torch.rand(v.shape, generator=generator).to(v.device)
    return torch.where(u >= drop_prob, v / (1 - drop_prob), 0)


def magprune(v: Tensor, density: float, epsilon: float, generator) -> Tensor:
    """DELLA's MagPrune (Deep et al. 2024), row by row: the entry of magnitude rank r (0 = the
    smallest of its row of n) survives with p = density − ε + 2ε·r/(n − 1), then × 1/p."""
    import torch

    n = v.shape[-1]
    order = v.abs().argsort(dim=-1, stable=True)
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(n, device=v.device).expand_as(order)
    )
    p = (density - epsilon) + (2 * epsilon / max(n - 1, 1)) * ranks.to(v.dtype)
    u = torch.rand(v.shape, generator=generator).to(device=v.device, dtype=v.dtype)
    return torch.where(u < p, v / p, 0)


def model_seeds(generator, n: int) -> list[int]:
    """One seed per model, drawn from the tensor's generator (the caller seeds it per tensor)."""
    import torch

    return torch.randint(0, 2**62, (n,), generator=generator).tolist()


# --- combining -------------------------------------------------------------------------------------
def consensus(vs: Sequence[Tensor], w: Sequence[float], *, normalize: bool) -> Tensor:
    """TIES's elect and disjoint merge: γ = +1 where Σ_i w_i·v_i ≥ 0, else −1; the sum of the
    w_i·v_i whose sign is γ, divided by the sum of their w_i when ``normalize`` (0 stays 1).

    Computed without masks: the positive and the negative parts are summed separately (in model
    order, so each equals the masked sum exactly) and γ picks one, as 1·a + 0·b.
    """
    import torch

    weighted = [w_i * v for w_i, v in zip(w, vs, strict=True)]
    total, pos, neg = weighted[0].clone(), weighted[0].clamp(min=0), weighted[0].clamp(max=0)
    for d in weighted[1:]:
        total.add_(d)
        pos.add_(d.clamp(min=0))
        neg.add_(d.clamp(max=0))
    plus = total.sign_().add_(1).clamp_(max=1)  # γ = +1 as 1, γ = −1 as 0
    mixed = pos.mul_(plus).add_(neg.mul_(1 - plus))
    if normalize:
        gamma = plus.mul_(2).sub_(1)
        divisor = torch.zeros_like(mixed)
        for w_i, d in zip(w, weighted, strict=True):
            # 1 where d has the sign γ, else 0 (also where d = 0)
            divisor.add_(d.sign().mul_(gamma).clamp_(min=0), alpha=w_i)
        mixed.div_(divisor.add_(1 - divisor.abs().sign()))  # a divisor of 0 becomes 1
    return mixed


def gram(passes: Callable[[], Iterator[list[Tensor]]]) -> list[list[float]]:
    """G_ij = Σ x_i·x_j over the whole tensor, accumulated in float64 block by block."""
    g: list[list[float]] | None = None
    for xs in passes():
        flat = [x.reshape(-1).double() for x in xs]
        if g is None:
            g = [[0.0] * len(xs) for _ in xs]
        for i, a in enumerate(flat):
            for j in range(i, len(flat)):
                g[i][j] += float(a @ flat[j])
                g[j][i] = g[i][j]
    return g or [[0.0]]


def stock_ratio(g: list[list[float]]) -> float:
    """Model Stock's t = N·cos θ / (1 + (N − 1)·cos θ), cos θ the mean pairwise cosine of the v_i
    (each clamped to [−1, 1], norms' product at least 1e-6); t = 0 where the denominator is
    below 1e-6, as mergekit keeps the base there."""
    n = len(g)
    cosines = [max(-1.0, min(1.0, g[i][j] / max(math.sqrt(g[i][i] * g[j][j]), 1e-6)))
               for i in range(n) for j in range(i + 1, n)]  # fmt: skip
    cos = sum(cosines) / len(cosines)
    denominator = 1 + (n - 1) * cos
    return 0.0 if abs(denominator) < 1e-6 else n * cos / denominator


def slerp_coefficients(g: list[list[float]], t: float) -> tuple[float, float]:
    """(a, b) with slerp(θ0, θ1; t) = a·θ0 + b·θ1: a = sin((1 − t)Ω)/sin Ω, b = sin(tΩ)/sin Ω,
    cos Ω = θ0·θ1 / (|θ0||θ1|) (a norm below 1e-8 counts as 1); linear, (1 − t, t), when
    |cos Ω| > 0.9995, where the arc is too flat to divide by sin Ω."""
    n0, n1 = (math.sqrt(g[i][i]) for i in (0, 1))
    cos = max(-1.0, min(1.0, g[0][1] / ((n0 if n0 > 1e-8 else 1.0) * (n1 if n1 > 1e-8 else 1.0))))
    if abs(cos) > 0.9995:
        return 1 - t, t
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
