"""The merge formulas, checked against independent numpy float64 references and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers_merge import ref_band, reference

from dem import DemError
from dem.merging import methods as M
from dem.merging import steps as S
from dem.merging.methods import METHODS

torch.set_num_threads(1)

# every method with non-default parameters; w is drawn positive for the sign-electing ones
CASES = {
    "dem": {},
    "linear": {},
    "task_arithmetic": {"lam": 0.7},
    "ties": {"density": 0.3, "lam": 1.2},
    "dare_linear": {"drop_prob": 0.4},
    "dare_ties": {"drop_prob": 0.4, "density": 0.6, "lam": 1.5},
    "breadcrumbs": {"density": 0.6, "gamma": 0.1, "lam": 0.9},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.2},
    "della": {"density": 0.5, "epsilon": 0.2, "lam": 1.1},
    "della_linear": {"density": 0.4, "epsilon": 0.1},
    "model_stock": {},
    "slerp": {},
}


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


def test_methods_table_is_complete_and_uniform():
    assert set(METHODS) == set(CASES)
    for m in METHODS.values():
        assert "θ" in m.formula and m.about  # every method documents its formula and source
        assert m.streams in ("in one pass", "after a statistics pass")
        assert not m.overwrites  # callers (the search) never need to copy the vectors
    assert [m.name for m in METHODS.values() if m.random] == [
        "dare_linear", "dare_ties", "della", "della_linear",
    ]  # fmt: skip


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("shape", [(9, 8), (13,)], ids=["matrix", "vector"])
def test_every_method_matches_its_float64_reference(method, shape):
    n = {"slerp": 1, "model_stock": 3}.get(method, 3)
    base, thetas, w, tb, tt = _inputs(n, shape=shape, seed=3)
    if method == "slerp":
        w = [0.3]
    elif method != "dem":
        w = [abs(x) + 0.1 for x in w]
    params = CASES[method]
    got = METHODS[method](tb, tt, w, name="layer.w", seed=4, **params)
    p = M.resolve_params(METHODS[method], params)
    ref = reference(method, _f64(base), [_f64(x) for x in thetas], w, p,
                    seed=M.tensor_seed(4, "layer.w"))  # fmt: skip
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-6, rtol=0)
    # float64 inputs give float64 arithmetic: agreement to rounding
    if not METHODS[method].random:  # (random draws compare u < p in float32 there)
        got64 = METHODS[method](tb.double(), [x.double() for x in tt], w, **params).numpy()
        np.testing.assert_allclose(got64, ref, atol=1e-12, rtol=0)


def test_methods_do_not_modify_inputs():
    _, _, w, tb, tt = _inputs()
    before = [tb.clone(), *[x.clone() for x in tt]]
    for method, params in CASES.items():
        if method != "slerp":
            METHODS[method](tb, tt, [abs(x) for x in w], **params)
    assert all(torch.equal(a, b) for a, b in zip(before, [tb, *tt], strict=True))


def ties(theta_base, thetas, w, density, lam=1.0):
    return METHODS["ties"](theta_base, thetas, w, density=density, lam=lam)


def test_ties_hand_worked():
    base = torch.zeros(4)
    v1, v2, v3 = [3, -1, 0.5, -4], [-2, 2.5, 1, 1], [1, -3, -0.2, 2]
    thetas = [torch.tensor(v) for v in (v1, v2, v3)]
    # density 0.5 keeps int(2.0) = 2 entries each: [3,0,0,-4], [-2,2.5,0,0], [0,-3,0,2];
    # mass [1,-0.5,0,-2] elects [+,-,+,-] (0 counts as +); agreeing entries: 3 | -3 | none | -4
    assert ties(base, thetas, [1, 1, 1], 0.5).tolist() == [3, -3, 0, -4]
    # base 1, lambda 0.5: 1 + 0.5 * [3, -3, 0, -4]
    assert ties(torch.ones(4), [t + 1 for t in thetas], [1, 1, 1], 0.5, lam=0.5).tolist() == [
        2.5, -0.5, 1, -1,
    ]  # fmt: skip
    # weights [1,2,1]: mass [3-4, 5-3, 0, -4+2] = [-1,2,0,-2] elects [-,+,+,-]:
    # entry 0 -> v2 alone: 2*(-2)/2 = -2 ; entry 1 -> 2*2.5/2 = 2.5 ; entry 3 -> v1: -4
    assert ties(base, thetas, [1, 2, 1], 0.5).tolist() == [-2, 2.5, 0, -4]
    # disjoint mean over several agreeing models, nothing trimmed
    two = [torch.tensor([1.0, -2]), torch.tensor([3.0, 1]), torch.tensor([-1.0, -1])]
    assert ties(torch.zeros(2), two, [1, 1, 1], 1.0).tolist() == [2, -1.5]
    # a negative weight votes with the weighted vector's sign: w·v = [1,-2], [3,1], [1,1];
    # entry 0: all agree, 5 / (1 + 1 - 1); entry 1: mass 0 elects +, 2 / (1 - 1 -> 1)
    assert ties(torch.zeros(2), two, [1, 1, -1], 1.0).tolist() == [5, 2]
    # an exact tie of the mass elects +: [1] and [-1] -> only the positive model counts
    assert ties(torch.zeros(1), [torch.ones(1), -torch.ones(1)], [1, 1], 1.0).tolist() == [1]


def test_densities_keep_int_density_times_numel_entries():
    # mergekit and peft: int(density * numel), which float rounding makes 28 here, not 29
    assert S.top_band(100, 0.29).stop == 28 and S.top_band(10, 0.01).stop == 1  # at least one
    assert S.top_band(10, 1.0).keeps_all
    b = S.outlier_band(100, 0.9, 0.05)  # drop the 5 largest, keep the next 90
    assert (b.start, b.stop) == (5, 95)
    b = S.outlier_band(100, 0.97, 0.05)  # only 3 can go: the outlier cut shrinks
    assert (b.start, b.stop) == (3, 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_magnitude_bands_are_exact_over_blocks_with_ties(dtype):
    """The radix selection over several blocks finds the same entries as one stable sort, with
    many equal magnitudes (of both signs) straddling every threshold."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(-6, 7, (23, 11), generator=g) * 0.125).to(dtype)
    x[3, :5] = 1e-30  # tiny magnitudes sort below 0.125 but above the zeros
    for start, stop in [(0, 60), (0, 1), (17, 200), (30, 31), (0, 253), (5, 5)]:
        bands = [S.Band(start, stop, x.numel()) for _ in range(2)]
        blocks = [x[r : r + 4] for r in range(0, 23, 4)]
        S.find_bands(lambda: ([blk, -blk] for blk in blocks), bands)  # noqa: B023
        for sign, band in zip((1, -1), bands, strict=True):
            got = torch.cat([S.keep_band(sign * blk, band) for blk in blocks])
            want = ref_band(sign * x.double().numpy(), start, stop)
            np.testing.assert_array_equal(got.double().numpy(), want, err_msg=f"{start}:{stop}")
            assert int((got != 0).sum()) == int((torch.from_numpy(want) != 0).sum())


def test_magnitude_bands_hand_worked():
    x = torch.tensor([[3.0, -1, 2], [0, -2, 3]])

    def kept(start, stop):
        band = S.Band(start, stop, x.numel())
        S.find_bands(lambda: iter([[x]]), [band])
        return S.keep_band(x, band).tolist()

    # ranks: 3 (0,0), 3 (1,2), 2 (0,2), -2 (1,1), -1, 0
    assert kept(0, 4) == [[3, 0, 2], [0, -2, 3]]  # the ties at 2 all kept: a cut at >= 2
    assert kept(0, 3) == [[3, 0, 2], [0, 0, 3]]  # the cut splits them: the earlier goes first
    assert kept(2, 5) == [[0, -1, 2], [0, -2, 0]]  # the ties at 3 all dropped: a cut at < 3
    assert kept(1, 3) == [[0, 0, 2], [0, 0, 3]]  # split at both ends
    x = torch.full((2, 2), -2.0)
    assert kept(1, 3) == [[0, -2], [-2, 0]]  # one group split at both ends


def test_dare_hand_worked():
    # torch.rand(4) from seed 0 draws [0.4963, 0.7682, 0.0885, 0.1320]; p = 0.5 keeps only
    # the second entry (0.7682 >= 0.5) and doubles it
    g = torch.Generator().manual_seed(0)
    assert S.dare(torch.tensor([1.0, 2, 3, 4]), 0.5, g).tolist() == [0, 4, 0, 0]
    g = torch.Generator().manual_seed(0)
    assert S.dare(torch.tensor([1.0, 2, 3, 4]), 0.0, g).tolist() == [1, 2, 3, 4]


def test_random_drops_are_unbiased_and_keep_the_right_fraction():
    v = torch.ones(200_000)
    out = S.dare(v, 0.9, torch.Generator().manual_seed(1))
    assert abs((out == 0).float().mean().item() - 0.9) < 0.005
    assert abs(out.mean().item() - 1.0) < 0.03
    assert out.unique().tolist() == [0.0, pytest.approx(10.0)]
    # MagPrune: keep rate rises with magnitude rank, from density - ε to density + ε, unbiased
    row = torch.arange(1, 1001, dtype=torch.float32).repeat(400, 1)  # ranks = positions
    kept = S.magprune(row, 0.5, 0.2, torch.Generator().manual_seed(2)) != 0
    rate = kept.float().mean(0)
    assert abs(rate[:100].mean().item() - 0.31) < 0.02 and abs(rate[-100:].mean() - 0.69) < 0.02
    pruned = S.magprune(torch.ones(200, 1000), 0.5, 0.2, torch.Generator().manual_seed(3))
    assert abs(pruned.mean().item() - 1.0) < 0.02


def test_random_methods_depend_on_seed_and_tensor_name_only():
    _, _, w, tb, tt = _inputs()
    for method in ("dare_linear", "della"):
        run = lambda s, n="a", m=method: METHODS[m](tb, tt, w, seed=s, name=n)  # noqa: E731
        assert torch.equal(run(7), run(7))
        assert not torch.equal(run(7), run(8)) and not torch.equal(run(7), run(7, "b"))
        # an unnamed tensor is seeded as the name "" (what a caller without names reproduces)
        assert torch.equal(METHODS[method](tb, tt, w, seed=7), run(7, ""))
    assert len({M.tensor_seed(s, n) for s in (0, 1) for n in ("a.weight", "b.weight")}) == 4


def test_model_stock_and_slerp_hand_worked():
    base = torch.zeros(2)
    # orthogonal vectors: cos 0, t = 0, the base; equal vectors: cos 1, t = 1, their mean
    ortho = [torch.tensor([1.0, 0]), torch.tensor([0.0, 1])]
    assert METHODS["model_stock"](base, ortho, [0.5, 0.5]).tolist() == [0, 0]
    same = [torch.tensor([1.0, 2]), torch.tensor([1.0, 2])]
    assert METHODS["model_stock"](base, same, [0.5, 0.5]).tolist() == [1, 2]
    # a quarter turn, t = 1/3: the point 30° along the unit arc
    got = METHODS["slerp"](torch.tensor([1.0, 0]), [torch.tensor([0.0, 1])], [1 / 3])
    np.testing.assert_allclose(got.numpy(), [np.sqrt(3) / 2, 0.5], atol=1e-6)
    # nearly parallel: plain interpolation
    got = METHODS["slerp"](torch.tensor([1.0, 0]), [torch.tensor([2.0, 1e-3])], [0.25])
    np.testing.assert_allclose(got.numpy(), [1.25, 0.25e-3], atol=1e-7)


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"density": 0}, "density 0.0 must be in (0, 1]"),
        ("dare_ties", {"density": 1.5}, "density 1.5 must be in (0, 1]"),
        ("dare_linear", {"drop_prob": 1}, "drop_prob 1.0 must be in [0, 1)"),
        ("ties", {"lam": float("inf")}, "lam inf must be a finite number"),
        ("ties", {"density": "a"}, "density 'a' is not a number"),
        ("breadcrumbs", {"gamma": 1}, "gamma 1.0 must be in [0, 1)"),
        ("della", {"density": 0.9, "epsilon": 0.2}, "epsilon 0.2 must leave density ± epsilon"),
        # the interval is open at both ends: a keep probability of 0 or 1 is no longer DELLA's
        ("della", {"density": 0.3, "epsilon": 0.3}, "epsilon 0.3 must leave density ± epsilon"),
        ("della", {"density": 0.75, "epsilon": 0.25}, "epsilon 0.25 must leave density ± epsilon"),
        ("dare_linear", {"seed": 1.5}, "seed 1.5 is not a whole number"),
        ("dare_linear", {"seed": float("nan")}, "seed nan is not a whole number"),
        (
            "dem",
            {"drop_prob": 0.5},
            "drop_prob does not apply to method 'dem' (only to dare_linear",
        ),
        ("dem", {"lam": 2.0}, "lam does not apply to method 'dem'"),
        ("dem", {"epsilon": 0.1}, "epsilon does not apply to method 'dem' (only to della"),
        ("dem", {"tau": 0.1}, "unknown merge parameter 'tau'"),
    ],
)
def test_parameters_are_checked_and_named(method, params, message):
    _, _, w, tb, tt = _inputs()
    with pytest.raises(DemError) as err:
        METHODS[method](tb, tt, w, **params)
    assert message in str(err.value)
    assert "--" not in str(err.value)  # the library speaks of parameters, never of flags


def test_model_counts_are_checked():
    _, _, w, tb, tt = _inputs()
    with pytest.raises(DemError, match="'slerp' takes exactly 1 model"):
        METHODS["slerp"](tb, tt, w)
    with pytest.raises(DemError, match="'model_stock' takes at least 2 model"):
        METHODS["model_stock"](tb, tt[:1], w[:1])


def test_defaults_and_harmless_parameters():
    m = METHODS["dare_ties"]
    assert M.resolve_params(m, {}) == {"lam": 1.0, "density": 1.0, "drop_prob": 0.9, "seed": 0}
    assert M.resolve_params(METHODS["ties"], {"density": None}) == {"lam": 1.0, "density": 0.2}
    assert M.resolve_params(METHODS["breadcrumbs"], {})["gamma"] == 0.01
    # λ = 1 and any seed change nothing for a method without them: accepted, not recorded
    assert M.resolve_params(METHODS["dem"], {"lam": 1.0, "seed": 7}) == {}
    with pytest.raises(
        DemError, match="unknown merge method 'nuslerp'; choose one of dem, linear, task_arithmetic"
    ):
        M.get_method("nuslerp")


def test_merge_weights_are_checked_and_named():
    assert M.check_weights([1, 0.5]) == [1.0, 0.5]
    with pytest.raises(DemError, match="^no models given: a merge needs at least one model"):
        M.check_weights([])
    # numbered from 1, as a user counts the models on the command line
    for bad in (float("nan"), float("-inf"), True, "0.5", None):
        with pytest.raises(DemError, match=rf"^model 2: weight {bad!r} is not a finite number$"):
            M.check_weights([0.5, bad])
    with pytest.raises(DemError, match=r"^model b: weight inf is not a finite number$"):
        M.check_weights([0.5, float("inf")], ["model a", "model b"])
    with pytest.raises(ValueError):  # a name for every weight, or a bug in the caller
        M.check_weights([0.5, 0.5], ["model a"])


def test_tensor_seed_is_a_fixed_function_of_seed_and_name():
    # pinned: DARE/DELLA masks drawn today are drawn again by every later version
    assert M.tensor_seed(0, "model.layers.0.mlp.up_proj.weight") == 6158259881492212288
    seeds = {M.tensor_seed(s, f"t{i}") for s in range(20) for i in range(50)}
    assert len(seeds) == 1000 and all(0 <= x < 2**63 for x in seeds)  # torch's manual_seed range
    assert max(seeds) > 2**62  # all 63 bits used
