"""The merge's invariants, property-tested over random shapes, dtypes, weights and block sizes.

Each property is a statement about the formulas (dem/merging/methods.py) that holds for any input,
not one worked case: zero weights give θ0, a one-hot weight gives that model, the weighted
sums are linear in w and blind to the order of the models, TIES without trimming or sign
conflict is task arithmetic, DARE dropping nothing is task arithmetic, and the streaming merge
(blocks of rows from files) computes what the in-memory one does, for every block size.
Tolerances are a few units of rounding of the dtype the arithmetic runs in, scaled by the
inputs' magnitude; where no rounding can differ, equality is exact.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from _helpers_merge import private_hash_cache  # noqa: F401 (autouse fixture)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load_file, save_file

from dem.merging import merge as streaming
from dem.merging.methods import METHODS

torch.set_num_threads(1)
# Modest counts keep the file well under 30 s on one core; deadline off: the first example
# pays for imports and the streaming merge's threads.
FAST = settings(max_examples=40, deadline=None)

DTYPES = {"float32": np.float32, "float64": np.float64}
# methods whose result is θ0 + Σ_i c·w_i·m_i(v_i), where the masks m_i do not depend on w
WEIGHTED_SUMS = {
    "dem": {},
    "task_arithmetic": {"lam": 0.75},
    "dare_linear": {"drop_prob": 0.3},
    "breadcrumbs": {"density": 0.6, "gamma": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.2},
}


@st.composite
def merges(draw, n_min: int = 1, n_max: int = 4, w_min: float = -2.0, w_max: float = 2.0):
    """θ0, the θ_i (as torch tensors of one dtype and shape) and one weight per model."""
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = draw(st.one_of(st.tuples(st.integers(1, 17)),
                           st.tuples(st.integers(1, 7), st.integers(1, 9))))  # fmt: skip
    n = draw(st.integers(n_min, n_max))
    values = st.floats(-4, 4, width=32)  # width 32: the same numbers in both dtypes
    arrays = [draw(hnp.arrays(dtype, shape, elements=values)) for _ in range(n + 1)]
    w = draw(st.lists(st.floats(w_min, w_max, width=32), min_size=n, max_size=n))
    tensors = [torch.from_numpy(a) for a in arrays]
    return tensors[0], tensors[1:], w


def _tolerance(theta0, thetas, w) -> float:
    """A few roundings of the compute dtype at the size of the largest term. Below the normal
    range rounding is absolute, a subnormal's spacing, whatever the size: hence the floor."""
    info = torch.finfo(theta0.dtype)
    size = max(float(t.abs().max()) for t in (theta0, *thetas))
    return 16 * max(info.eps * size, info.smallest_normal * info.eps) * (1 + sum(abs(x) for x in w))


def _close(got, want, tol) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert float((got - want).abs().max()) <= tol, float((got - want).abs().max())


@FAST
@given(case=merges(n_min=2), method=st.sampled_from(
    ["dem", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
     "breadcrumbs_ties", "della", "della_linear", "model_stock"]))  # fmt: skip
def test_all_weights_zero_give_the_base(case, method):
    theta0, thetas, w = case
    got = METHODS[method](theta0, thetas, [0.0] * len(w), name="t", seed=1)
    assert torch.equal(got, theta0)


ONE_HOT = {
    "dem": {},
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 1.0},
    "dare_linear": {"drop_prob": 0.0},
    "dare_ties": {"drop_prob": 0.0, "density": 1.0},
    "breadcrumbs": {"density": 1.0, "gamma": 0.0},
    "breadcrumbs_ties": {"density": 1.0, "gamma": 0.0},
}


@FAST
@given(case=merges(), method=st.sampled_from(sorted(ONE_HOT)), data=st.data())
def test_one_weight_one_and_the_rest_zero_give_that_model(case, method, data):
    theta0, thetas, w = case
    k = data.draw(st.integers(0, len(thetas) - 1))
    one_hot = [1.0 if i == k else 0.0 for i in range(len(thetas))]
    got = METHODS[method](theta0, thetas, one_hot, name="t", **ONE_HOT[method])
    _close(got, thetas[k], _tolerance(theta0, thetas, one_hot))


@FAST
@given(case=merges(), method=st.sampled_from(sorted(WEIGHTED_SUMS)), data=st.data())
def test_the_weighted_sums_are_linear_in_the_weights(case, method, data):
    theta0, thetas, w_a = case
    w_b = data.draw(st.lists(st.floats(-2, 2, width=32), min_size=len(w_a), max_size=len(w_a)))
    c = data.draw(st.floats(-3, 3, width=32))

    def vector(w):  # the merged θ − θ0, same seed: the same DARE/MagPrune masks
        return (
            METHODS[method](theta0, thetas, w, name="t", seed=5, **WEIGHTED_SUMS[method]) - theta0
        )

    both = [a + b for a, b in zip(w_a, w_b, strict=True)]
    tol = _tolerance(theta0, thetas, [*w_a, *w_b, *(c * x for x in w_a)]) * 8
    _close(vector(both), vector(w_a) + vector(w_b), tol)
    _close(vector([c * x for x in w_a]), c * vector(w_a), tol)
    # the soup Σ w_i·θ_i has no θ0 and is linear in w too
    soup = lambda w: METHODS["linear"](theta0, thetas, w)  # noqa: E731
    _close(soup(both), soup(w_a) + soup(w_b), tol)


def _clear_election(thetas, theta0, w) -> bool:
    """No entry whose TIES sign election is decided by rounding (Σ w_i·v_i within 1e-4 of 0
    relative to its terms): there summation order may elect either sign."""
    d = torch.stack(
        [w_i * (t.double() - theta0.double()) for w_i, t in zip(w, thetas, strict=True)]
    )
    mass, size = d.sum(0).abs(), d.abs().sum(0)
    return bool(((mass > 1e-4 * size) | (size == 0)).all())


@FAST
@given(case=merges(n_min=2, w_min=0.125), data=st.data(), method=st.sampled_from(
    ["dem", "task_arithmetic", "linear", "ties", "breadcrumbs", "breadcrumbs_ties",
     "model_stock"]))  # fmt: skip
def test_the_order_of_the_models_does_not_matter(case, data, method):
    theta0, thetas, w = case
    if "ties" in method:
        assume(_clear_election(thetas, theta0, w))
    order = data.draw(st.permutations(range(len(thetas))))
    params = {"ties": {"density": 0.5}, "breadcrumbs": {"density": 0.7, "gamma": 0.1},
              "breadcrumbs_ties": {"density": 0.7, "gamma": 0.1}}.get(method, {})  # fmt: skip
    got = METHODS[method](theta0, [thetas[i] for i in order], [w[i] for i in order], **params)
    _close(got, METHODS[method](theta0, thetas, w, **params), _tolerance(theta0, thetas, w))


@FAST
@given(case=merges(w_min=0.125), data=st.data())
def test_ties_at_density_one_without_sign_conflict_is_task_arithmetic(case, data):
    """TIES divides by the agreeing weights, Σ w_i where no sign conflicts: task arithmetic with
    weights w_i / Σ w_i."""
    theta0, thetas, w = case
    sign = torch.from_numpy(
        data.draw(hnp.arrays(np.int8, theta0.shape, elements=st.sampled_from([-1, 1])))
    )
    # every v_i takes the same sign entry by entry, and none is 0
    thetas = [theta0 + sign.to(theta0.dtype) * (t.abs() + 0.5) for t in thetas]
    lam = data.draw(st.floats(0.125, 2, width=32))
    got = METHODS["ties"](theta0, thetas, w, density=1.0, lam=lam)
    total = sum(w)
    want = METHODS["task_arithmetic"](theta0, thetas, [x / total for x in w], lam=lam)
    _close(got, want, _tolerance(theta0, thetas, w) * (1 + lam))


@FAST
@given(case=merges(w_min=0.125), seed=st.integers(0, 2**31 - 1), density=st.floats(0.05, 1))
def test_dare_dropping_nothing_is_the_method_without_dare(case, seed, density):
    theta0, thetas, w = case
    dare = METHODS["dare_linear"](theta0, thetas, w, drop_prob=0.0, seed=seed, name="t")
    assert torch.equal(dare, METHODS["dem"](theta0, thetas, w))
    dare_ties = METHODS["dare_ties"](theta0, thetas, w, drop_prob=0.0, density=density, seed=seed)
    assert torch.equal(dare_ties, METHODS["ties"](theta0, thetas, w, density=density))


# every method with parameters away from their defaults; positive weights for the elections
STREAMED = {
    "dem": {}, "linear": {}, "task_arithmetic": {"lam": 0.5},
    "ties": {"density": 0.3}, "dare_linear": {"drop_prob": 0.4},
    "dare_ties": {"drop_prob": 0.4, "density": 0.6}, "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.7, "gamma": 0.1}, "della": {"density": 0.6, "epsilon": 0.2},
    "della_linear": {"density": 0.5, "epsilon": 0.1}, "model_stock": {}, "slerp": {},
}  # fmt: skip
# whole-tensor dot products (cosines) summed block by block: rounding depends on the blocks
GRAM = {"model_stock", "slerp"}


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(case=merges(n_min=2, n_max=3, w_min=0.125), method=st.sampled_from(sorted(STREAMED)),
       rows_per_block=st.integers(1, 8), stored=st.sampled_from(["float32", "bfloat16"]))  # fmt: skip
def test_the_streaming_merge_equals_the_in_memory_merge_for_every_block_size(
    case, method, rows_per_block, stored
):
    theta0, thetas, w = case
    if method == "slerp":
        thetas, w = thetas[:1], [min(w[0], 1.0)]
    dtype = getattr(torch, stored)
    as_model = lambda t: {"a.weight": t.reshape(t.shape[0], -1).to(dtype),  # noqa: E731
                          "b.bias": t.flatten().flip(0).to(dtype)}  # fmt: skip
    files = [as_model(t) for t in (theta0, *thetas)]
    cols = files[0]["a.weight"].shape[1]
    with tempfile.TemporaryDirectory() as d:
        folders = [_save(Path(d) / f"m{i}", f) for i, f in enumerate(files)]
        with mock.patch.object(streaming, "CHUNK", rows_per_block * cols):
            out = streaming.merge(folders[0], list(zip(folders[1:], w, strict=True)),
                                  Path(d) / "out", method=method, seed=7, progress=False,
                                  **STREAMED[method])  # fmt: skip
        got = load_file(out / "model.safetensors")
    for name, base in files[0].items():
        # the in-memory merge from the same stored numbers, in float32 as the stream computes
        want = METHODS[method](base.float(), [f[name].float() for f in files[1:]], w, name=name,
                               seed=7, **STREAMED[method]).to(dtype)  # fmt: skip
        if method in GRAM:
            tol = _tolerance(base.float(), [f[name].float() for f in files[1:]], w)
            # and a stored bfloat16 may round the other way: one unit in its last place
            ulp = torch.finfo(dtype).eps * float(want.float().abs().max())
            _close(got[name].float(), want.float(), tol + ulp)
        else:
            assert torch.equal(got[name], want), name
