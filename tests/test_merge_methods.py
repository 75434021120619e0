"""The merge formulas, checked against independent numpy float64 references and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dem import merge as M

torch.set_num_threads(1)


def _inputs(n_models: int = 3, shape=(7, 5), seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    thetas = [base + rng.normal(scale=0.1, size=shape) for _ in range(n_models)]
    w = list(rng.uniform(-0.5, 1.5, size=n_models))
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return base, thetas, w, t(base), [t(x) for x in thetas]


def _f64(a) -> np.ndarray:
    """What the fp32 torch inputs hold, in float64 (the reference starts from the same values)."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _ties_ref(vectors: list[np.ndarray], w: list[float], density: float) -> np.ndarray:
    """TIES written entry by entry with argsort: trim, elect by weighted mass, disjoint mean."""
    trimmed = []
    for v in vectors:
        flat = v.ravel()
        k = int(round(density * flat.size))
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        out = np.zeros_like(flat)
        out[keep] = flat[keep]
        trimmed.append(out)
    merged = np.zeros_like(trimmed[0])
    for j in range(merged.size):
        gamma = np.sign(sum(w_i * t[j] for w_i, t in zip(w, trimmed, strict=True)))
        agree = [i for i, t in enumerate(trimmed) if gamma != 0 and np.sign(t[j]) == gamma]
        if agree:
            merged[j] = sum(w[i] * trimmed[i][j] for i in agree) / sum(w[i] for i in agree)
    return merged.reshape(vectors[0].shape)


def _uniforms(seed: int, shape, n: int) -> list[np.ndarray]:
    """The U[0,1) draws DARE makes for n vectors (the RNG is an input, not under test)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g).double().numpy() for _ in range(n)]


def test_dem_linear_task_arithmetic_match_float64_reference():
    base, thetas, w, tb, tt = _inputs()
    b, ts = _f64(base), [_f64(x) for x in thetas]
    ref_dem = b + sum(wi * (x - b) for wi, x in zip(w, ts, strict=True))
    np.testing.assert_allclose(M.dem(tb, tt, w).double().numpy(), ref_dem, atol=1e-6, rtol=0)
    ref_lin = sum(wi * x for wi, x in zip(w, ts, strict=True))
    np.testing.assert_allclose(M.linear(tt, w).double().numpy(), ref_lin, atol=1e-6, rtol=0)
    ref_ta = b + 0.7 * sum(x - b for x in ts)
    np.testing.assert_allclose(M.task_arithmetic(tb, tt, 0.7).double().numpy(), ref_ta, atol=1e-6)
    # float64 inputs give float64 arithmetic: agreement to rounding
    d = M.dem(tb.double(), [x.double() for x in tt], w).numpy()
    np.testing.assert_allclose(d, ref_dem, atol=1e-13, rtol=0)


def test_dem_does_not_modify_inputs():
    _, _, w, tb, tt = _inputs()
    before = [tb.clone(), *[x.clone() for x in tt]]
    for fn in (lambda: M.dem(tb, tt, w), lambda: M.ties(tb, tt, w, 0.5), lambda: M.linear(tt, w)):
        fn()
    assert all(torch.equal(a, b) for a, b in zip(before, [tb, *tt], strict=True))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(density):
    base, thetas, w, tb, tt = _inputs(shape=(6, 9), seed=3)
    w = [abs(x) + 0.1 for x in w]
    b = _f64(base)
    vectors = [_f64(x) - b for x in thetas]
    ref = b + 0.8 * _ties_ref(vectors, w, density)
    got = M.ties(tb, tt, w, density, lam=0.8).double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_ties_hand_worked():
    base = torch.zeros(4)
    v1, v2, v3 = [3, -1, 0.5, -4], [-2, 2.5, 1, 1], [1, -3, -0.2, 2]
    thetas = [torch.tensor(v) for v in (v1, v2, v3)]
    # density 0.5 keeps two entries each: [3,0,0,-4], [-2,2.5,0,0], [0,-3,0,2];
    # mass [1,-0.5,0,-2] elects [+,-,0,-]; agreeing entries: 3 | -3 | none | -4
    assert M.ties(base, thetas, [1, 1, 1], 0.5).tolist() == [3, -3, 0, -4]
    # base 1, lambda 0.5: 1 + 0.5 * [3, -3, 0, -4]
    assert M.ties(torch.ones(4), [t + 1 for t in thetas], [1, 1, 1], 0.5, lam=0.5).tolist() == [
        2.5, -0.5, 1, -1,
    ]  # fmt: skip
    # weights [1,2,1]: mass [3-4, 5-3, 0, -4+2] = [-1,2,0,-2] elects [-,+,0,-]:
    # entry 0 -> v2 alone: 2*(-2)/2 = -2 ; entry 1 -> 2*2.5/2 = 2.5 ; entry 3 -> v1: -4
    assert M.ties(base, thetas, [1, 2, 1], 0.5).tolist() == [-2, 2.5, 0, -4]
    # disjoint mean over several agreeing models, nothing trimmed
    two = [torch.tensor([1.0, -2]), torch.tensor([3.0, 1]), torch.tensor([-1.0, -1])]
    assert M.ties(torch.zeros(2), two, [1, 1, 1], 1.0).tolist() == [2, -1.5]


def test_trim_counts():
    v = torch.tensor([0.1, -5, 3, -0.2, 4])
    assert M.trim(v, 0.4).tolist() == [0, -5, 0, 0, 4]
    assert M.trim(v, 1.0).tolist() == v.tolist()
    assert M.trim(v, 0.01).tolist() == [0] * 5  # round(0.05) = 0 entries kept


def test_dare_hand_worked():
    # torch.rand(4) from seed 0 draws [0.4963, 0.7682, 0.0885, 0.1320]; p = 0.5 keeps only
    # the second entry (0.7682 >= 0.5) and doubles it
    g = torch.Generator().manual_seed(0)
    out = M.dare(torch.tensor([1.0, 2, 3, 4]), 0.5, g)
    assert out.tolist() == [0, 4, 0, 0]
    g = torch.Generator().manual_seed(0)
    assert M.dare(torch.tensor([1.0, 2, 3, 4]), 0.0, g).tolist() == [1, 2, 3, 4]


def test_dare_is_unbiased_and_drops_the_right_fraction():
    v = torch.ones(200_000)
    out = M.dare(v.clone(), 0.9, torch.Generator().manual_seed(1))
    assert abs((out == 0).float().mean().item() - 0.9) < 0.005
    assert abs(out.mean().item() - 1.0) < 0.03
    assert out.unique().tolist() == [0.0, pytest.approx(10.0)]


def test_dare_linear_and_dare_ties_match_reference():
    base, thetas, w, tb, tt = _inputs(shape=(8, 8), seed=5)
    w = [abs(x) + 0.1 for x in w]
    b = _f64(base)
    u = _uniforms(42, tb.shape, len(tt))
    dropped = [(_f64(x) - b) * (ui >= 0.3) / 0.7 for x, ui in zip(thetas, u, strict=True)]
    ref = b + sum(wi * d for wi, d in zip(w, dropped, strict=True))
    got = M.dare_linear(tb, tt, w, 0.3, torch.Generator().manual_seed(42)).double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    ref = b + 1.5 * _ties_ref(dropped, w, 0.5)
    got = M.dare_ties(tb, tt, w, 0.3, 0.5, torch.Generator().manual_seed(42), lam=1.5)
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-6, rtol=0)


def test_dare_determinism_by_seed():
    _, _, w, tb, tt = _inputs()
    run = lambda s: M.dare_linear(tb, tt, w, 0.5, torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    # a tensor's seed depends on (seed, name) only, never on the position of the tensor
    assert M.tensor_seed(0, "a.weight") == M.tensor_seed(0, "a.weight")
    assert len({M.tensor_seed(s, n) for s in (0, 1) for n in ("a.weight", "b.weight")}) == 4


def test_methods_table_is_complete_and_uniform():
    assert set(M.METHODS) == set(M.PURE) == {"dem", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"}  # fmt: skip
    for fn in M.METHODS.values():
        assert "θ" in fn.__doc__  # every method documents its formula
    _, _, w, tb, tt = _inputs()
    g = lambda: torch.Generator().manual_seed(M.tensor_seed(4, "layer.w"))  # noqa: E731
    expected = {
        "dem": M.dem(tb, tt, w),
        "linear": M.linear(tt, w),
        "task_arithmetic": M.task_arithmetic(tb, tt, 0.5, w),
        "ties": M.ties(tb, tt, w, 0.2),
        "dare_linear": M.dare_linear(tb, tt, w, 0.9, g()),
        "dare_ties": M.dare_ties(tb, tt, w, 0.3, 0.7, g(), lam=2.0),
    }
    options = {"task_arithmetic": {"lam": 0.5}, "dare_ties": {"drop_prob": 0.3, "density": 0.7, "lam": 2.0}}  # fmt: skip
    for method, want in expected.items():
        got = M.METHODS[method](tb, tt, w, name="layer.w", seed=4, **options.get(method, {}))
        assert torch.equal(got, want), method
    with pytest.raises(M.DemError, match="--density does not apply"):
        M.METHODS["dem"](tb, tt, w, density=0.5)
