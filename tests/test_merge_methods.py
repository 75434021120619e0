"""The merge formulas, checked against independent numpy float64 references and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dem import DemError
from dem import methods as M
from dem.methods import METHODS

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


def ties(theta_base, thetas, w, density, lam=1.0):
    return METHODS["ties"](theta_base, thetas, w, density=density, lam=lam)


def _uniforms(seed: int, shape, n: int) -> list[np.ndarray]:
    """The U[0,1) draws DARE makes for n vectors (the RNG is an input, not under test)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(shape, generator=g).double().numpy() for _ in range(n)]


def test_dem_linear_task_arithmetic_match_float64_reference():
    base, thetas, w, tb, tt = _inputs()
    b, ts = _f64(base), [_f64(x) for x in thetas]
    dem, linear, task_arithmetic = (METHODS[m] for m in ("dem", "linear", "task_arithmetic"))
    ref_dem = b + sum(wi * (x - b) for wi, x in zip(w, ts, strict=True))
    np.testing.assert_allclose(dem(tb, tt, w).double().numpy(), ref_dem, atol=1e-6, rtol=0)
    ref_lin = sum(wi * x for wi, x in zip(w, ts, strict=True))
    np.testing.assert_allclose(linear(tb, tt, w).double().numpy(), ref_lin, atol=1e-6, rtol=0)
    ref_ta = b + 0.7 * sum(x - b for x in ts)
    got = task_arithmetic(tb, tt, [1.0] * len(tt), lam=0.7).double().numpy()
    np.testing.assert_allclose(got, ref_ta, atol=1e-6)
    # float64 inputs give float64 arithmetic: agreement to rounding
    d = dem(tb.double(), [x.double() for x in tt], w).numpy()
    np.testing.assert_allclose(d, ref_dem, atol=1e-13, rtol=0)


def test_dem_does_not_modify_inputs():
    _, _, w, tb, tt = _inputs()
    before = [tb.clone(), *[x.clone() for x in tt]]
    for method, params in [("dem", {}), ("ties", {"density": 0.5}), ("linear", {}),
                           ("dare_ties", {"drop_prob": 0.5})]:  # fmt: skip
        METHODS[method](tb, tt, w, **params)
    assert all(torch.equal(a, b) for a, b in zip(before, [tb, *tt], strict=True))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(density):
    base, thetas, w, tb, tt = _inputs(shape=(6, 9), seed=3)
    w = [abs(x) + 0.1 for x in w]
    b = _f64(base)
    vectors = [_f64(x) - b for x in thetas]
    ref = b + 0.8 * _ties_ref(vectors, w, density)
    got = ties(tb, tt, w, density, lam=0.8).double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


def test_ties_hand_worked():
    base = torch.zeros(4)
    v1, v2, v3 = [3, -1, 0.5, -4], [-2, 2.5, 1, 1], [1, -3, -0.2, 2]
    thetas = [torch.tensor(v) for v in (v1, v2, v3)]
    # density 0.5 keeps two entries each: [3,0,0,-4], [-2,2.5,0,0], [0,-3,0,2];
    # mass [1,-0.5,0,-2] elects [+,-,0,-]; agreeing entries: 3 | -3 | none | -4
    assert ties(base, thetas, [1, 1, 1], 0.5).tolist() == [3, -3, 0, -4]
    # base 1, lambda 0.5: 1 + 0.5 * [3, -3, 0, -4]
    assert ties(torch.ones(4), [t + 1 for t in thetas], [1, 1, 1], 0.5, lam=0.5).tolist() == [
        2.5, -0.5, 1, -1,
    ]  # fmt: skip
    # weights [1,2,1]: mass [3-4, 5-3, 0, -4+2] = [-1,2,0,-2] elects [-,+,0,-]:
    # entry 0 -> v2 alone: 2*(-2)/2 = -2 ; entry 1 -> 2*2.5/2 = 2.5 ; entry 3 -> v1: -4
    assert ties(base, thetas, [1, 2, 1], 0.5).tolist() == [-2, 2.5, 0, -4]
    # disjoint mean over several agreeing models, nothing trimmed
    two = [torch.tensor([1.0, -2]), torch.tensor([3.0, 1]), torch.tensor([-1.0, -1])]
    assert ties(torch.zeros(2), two, [1, 1, 1], 1.0).tolist() == [2, -1.5]


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
    dare_linear, dare_ties = METHODS["dare_linear"], METHODS["dare_ties"]
    gen = lambda: torch.Generator().manual_seed(42)  # noqa: E731
    got = dare_linear(tb, tt, w, drop_prob=0.3, generator=gen()).double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    ref = b + 1.5 * _ties_ref(dropped, w, 0.5)
    got = dare_ties(tb, tt, w, drop_prob=0.3, density=0.5, generator=gen(), lam=1.5)
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-6, rtol=0)


def test_dare_determinism_by_seed():
    _, _, w, tb, tt = _inputs()
    run = lambda s: METHODS["dare_linear"](tb, tt, w, drop_prob=0.5, seed=s)  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    # a tensor's seed depends on (seed, name) only, never on the position of the tensor
    assert M.tensor_seed(0, "a.weight") == M.tensor_seed(0, "a.weight")
    assert len({M.tensor_seed(s, n) for s in (0, 1) for n in ("a.weight", "b.weight")}) == 4


def test_methods_table_is_complete_and_uniform():
    assert set(METHODS) == {"dem", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
    for m in METHODS.values():
        assert "θ" in m.formula  # every method documents its formula
    _, _, w, tb, tt = _inputs()
    g = lambda: torch.Generator().manual_seed(M.tensor_seed(4, "layer.w"))  # noqa: E731
    v = lambda: [t - tb for t in tt]  # noqa: E731
    # the steps composed by hand, with each method's default parameters
    expected = {
        "dem": M.weighted_sum(v(), w) + tb,
        "linear": M.weighted_sum(tt, w),
        "task_arithmetic": M.weighted_sum(v(), [0.5 * w_i for w_i in w]) + tb,
        "ties": tb + 1.0 * M.ties_delta(v(), w, 0.2),
        "dare_linear": M.weighted_sum([M.dare(x, 0.9, gen) for gen in [g()] for x in v()], w) + tb,
        "dare_ties": tb + 2.0 * M.ties_delta([M.dare(x, 0.3, gen) for gen in [g()] for x in v()],
                                             w, 0.7),
    }  # fmt: skip
    options = {"task_arithmetic": {"lam": 0.5}, "dare_ties": {"drop_prob": 0.3, "density": 0.7, "lam": 2.0}}  # fmt: skip
    for method, want in expected.items():
        got = METHODS[method](tb, tt, w, name="layer.w", seed=4, **options.get(method, {}))
        assert torch.equal(got, want), method
    with pytest.raises(DemError, match="density does not apply"):
        METHODS["dem"](tb, tt, w, density=0.5)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"density": 0}, "density 0.0 must be in (0, 1]"),
        ("dare_ties", {"density": 1.5}, "density 1.5 must be in (0, 1]"),
        ("dare_linear", {"drop_prob": 1}, "drop_prob 1.0 must be in [0, 1)"),
        ("ties", {"lam": float("inf")}, "lam inf must be a finite number"),
        ("ties", {"density": "a"}, "density 'a' is not a number"),
        (
            "dem",
            {"drop_prob": 0.5},
            "drop_prob does not apply to method 'dem' (only to dare_linear",
        ),
        ("dem", {"lam": 2.0}, "lam does not apply to method 'dem'"),
        ("dem", {"epsilon": 0.1}, "unknown merge parameter 'epsilon'"),
    ],
)
def test_parameters_are_checked_and_named(method, params, message):
    _, _, w, tb, tt = _inputs()
    with pytest.raises(DemError) as err:
        METHODS[method](tb, tt, w, **params)
    assert message in str(err.value)
    assert "--" not in str(err.value)  # the library speaks of parameters, never of flags


def test_defaults_and_harmless_parameters():
    m = METHODS["dare_ties"]
    assert M.resolve_params(m, {}) == {"lam": 1.0, "density": 1.0, "drop_prob": 0.9, "seed": 0}
    assert M.resolve_params(METHODS["ties"], {"density": None}) == {"lam": 1.0, "density": 0.2}
    # λ = 1 and any seed change nothing for a method without them: accepted, not recorded
    assert M.resolve_params(METHODS["dem"], {"lam": 1.0, "seed": 7}) == {}
    with pytest.raises(DemError, match="unknown merge method 'slerp'; choose one of dem"):
        M.get_method("slerp")
    assert [m.name for m in METHODS.values() if m.random] == ["dare_linear", "dare_ties"]
