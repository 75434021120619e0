"""Weight search: the in-memory merge is exact, and each strategy finds what it should."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dem import DemError
from dem.search.strategies import STRATEGIES, Strategy
from dem.search.weights import InMemoryMerge, best_weights, search_weights


def _tiny_llama(seed: int, tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config)


def _vector(base: torch.nn.Module, tuned: torch.nn.Module) -> dict[str, torch.Tensor]:
    tuned_sd = tuned.state_dict()
    return {k: tuned_sd[k] - v for k, v in base.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("tie", [True, False])
def test_in_memory_merge_matches_float64_reference(tie):
    base, a, b = (_tiny_llama(s, tie) for s in (0, 1, 2))
    theta_0 = {k: v.double().clone() for k, v in base.state_dict().items()}
    vectors = {"a": _vector(base, a), "b": _vector(base, b)}
    merger = InMemoryMerge(base, vectors)
    w = {"a": 0.7, "b": -0.25}
    merger.apply(w)
    merged = base.state_dict()
    for name, tensor in merged.items():
        if not tensor.is_floating_point():
            continue
        reference = (
            theta_0[name] + 0.7 * vectors["a"][name].double() - 0.25 * vectors["b"][name].double()
        )
        torch.testing.assert_close(tensor.double(), reference, rtol=0, atol=1e-6)
    if tie:  # the tied head follows the merged embedding
        assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    merger.restore_base()
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(tensor.double(), theta_0[name], rtol=0, atol=0)


def test_in_memory_merge_rejects_mismatched_vectors():
    base, a = _tiny_llama(0), _tiny_llama(1)
    vector = _vector(base, a)
    name = next(iter(vector))
    del vector[name]
    with pytest.raises(DemError, match=f"no tensor '{name}'"):
        InMemoryMerge(base, {"a": vector})
    vector = _vector(base, a)
    vector[name] = vector[name][:1]
    with pytest.raises(DemError, match="has shape"):
        InMemoryMerge(base, {"a": vector})
    merger = InMemoryMerge(base, {"a": _vector(base, a)})
    with pytest.raises(DemError, match="unknown sources"):
        merger.apply({"z": 1.0})
    with pytest.raises(DemError, match="expected 1 weights"):
        merger.apply([1.0, 2.0])


def _bowl(target: dict[str, float]):
    """A smooth objective with its minimum at ``target``; counts its evaluations."""
    calls = []

    def score(w):
        calls.append(dict(w))
        loss = sum((w[k] - target[k]) ** 2 for k in target)
        return {"objective": loss, "extra": 1.0}

    return score, calls


def test_grid_evaluates_the_cartesian_product_and_finds_the_minimum():
    score, calls = _bowl({"a": 0.5, "b": 0.25, "c": 1.0})
    trials = search_weights(score, ["a", "b", "c"], "grid", values=[0.0, 0.25, 0.5, 0.75, 1.0])
    assert len(trials) == len(calls) == 125
    assert best_weights(trials) == {"a": 0.5, "b": 0.25, "c": 1.0}
    assert trials["objective"].is_monotonic_increasing
    assert {"trial", "w_a", "w_b", "w_c", "objective", "extra"} <= set(trials.columns)
    # the paper's grid is the default strategy
    default = search_weights(score, ["a", "b", "c"], values=[0.0, 0.25, 0.5, 0.75, 1.0])
    assert default.drop(columns="elapsed_s").equals(trials.drop(columns="elapsed_s"))


def test_coordinate_ascent_reaches_the_grid_optimum_with_fewer_evaluations():
    target = {"a": 0.75, "b": 0.0, "c": 0.5, "d": 1.0}
    score, calls = _bowl(target)
    trials = search_weights(score, list(target), "coordinate", values=[0.0, 0.25, 0.5, 0.75, 1.0])
    assert best_weights(trials) == target
    assert len(calls) < 5**4 / 10
    assert len({tuple(sorted(c.items())) for c in calls}) == len(calls), (
        "a candidate was re-evaluated"
    )


def test_maximize_and_random_are_seeded():
    def score(w):
        return {"objective": -((w["a"] - 0.3) ** 2)}

    def run(seed):  # elapsed_s is a timing: everything else must repeat
        trials = search_weights(score, ["a"], "random", n_trials=20, seed=seed, minimize=False)
        assert trials.sort_values("trial")["elapsed_s"].is_monotonic_increasing
        return trials.drop(columns="elapsed_s")

    first, again, other = run(3), run(3), run(4)
    assert first.equals(again)
    assert not first.equals(other)
    assert first["w_a"].between(0, 1).all()
    assert abs(best_weights(first)["a"] - 0.3) == (first["w_a"] - 0.3).abs().min()


def test_bad_strategy_is_a_clear_error():
    with pytest.raises(DemError, match="unknown search strategy 'bayes'"):
        search_weights(lambda w: {"objective": 0.0}, ["a"], "bayes")
    with pytest.raises(DemError, match="unknown search option 'n_trail'"):
        search_weights(lambda w: {"objective": 0.0}, ["a"], "grid", n_trail=3)


def test_tpe_is_seeded_scores_n_trials_in_the_grid_range_and_defaults_to_the_grid_count():
    score, calls = _bowl({"a": 0.3, "b": 0.8})

    def run(seed, **options):
        trials = search_weights(score, ["a", "b"], "tpe", values=[0.0, 0.5, 1.0], seed=seed,
                                **options)  # fmt: skip
        return trials.drop(columns="elapsed_s")

    first = run(1, n_trials=12)
    assert len(first) == 12 and len(calls) == 12  # the 2 individuals are 2 of the 12
    assert first["trial"].tolist() != list(range(12)), "the table is not sorted by objective"
    assert first.sort_values("trial").iloc[:2][["w_a", "w_b"]].values.tolist() == [[1, 0], [0, 1]]
    assert first.equals(run(1, n_trials=12))
    assert not first.equals(run(2, n_trials=12))
    assert first[["w_a", "w_b"]].stack().between(0.0, 1.0).all()
    assert first["objective"].iloc[0] == first["objective"].min() < 0.05  # it finds the bowl
    assert len(run(1)) == 3**2  # as many as the grid of the same values scores
    inside = run(1, n_trials=6, low=0.2, high=0.6, include_individuals=False)
    assert len(inside) == 6 and inside[["w_a", "w_b"]].stack().between(0.2, 0.6).all()


def test_a_registered_strategy_is_dispatched_with_only_its_own_options():
    seen = {}

    def halves(trials, *, values=(0.5,), seed=0):
        seen.update(values=values, seed=seed)
        trials.evaluate_all([[v] * len(trials.names) for v in values])
        return {"note": "halves"}

    strategy = Strategy("halves", "every weight at each value in turn", halves)
    assert strategy.params == ("values", "seed")
    try:
        STRATEGIES["halves"] = strategy
        score, calls = _bowl({"a": 0.5, "b": 0.5})
        trials = search_weights(score, ["a", "b"], "halves", values=[0.25, 0.5], seed=4, steps=9)
    finally:
        del STRATEGIES["halves"]
    assert seen == {"values": [0.25, 0.5], "seed": 4}  # steps: the gradient's, not passed
    assert calls == [{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0},
                     {"a": 0.25, "b": 0.25}, {"a": 0.5, "b": 0.5}]  # fmt: skip
    assert best_weights(trials) == {"a": 0.5, "b": 0.5} and trials.attrs["note"] == "halves"


def test_apply_method_leaves_the_stored_vectors_alone():
    base, a, b = (_tiny_llama(s) for s in (0, 1, 2))
    merger = InMemoryMerge(base, {"a": _vector(base, a), "b": _vector(base, b)})
    stored = {s: {n: v.clone() for n, v in vec.items()} for s, vec in merger.vectors.items()}
    merger.apply_method("dare_linear", [0.5, 0.5], drop_prob=0.5, seed=1)  # DARE drops in place
    first = {n: p.detach().clone() for n, p in base.named_parameters()}
    merger.apply_method("dare_linear", [0.5, 0.5], drop_prob=0.5, seed=1)
    assert all(torch.equal(p, first[n]) for n, p in base.named_parameters())
    for s, vec in merger.vectors.items():
        assert all(torch.equal(v, stored[s][n]) for n, v in vec.items())
    with pytest.raises(DemError, match="unknown merge method 'bogus'"):
        merger.apply_method("bogus", [0.5, 0.5])
    with pytest.raises(DemError, match="'slerp' takes exactly 1 model"):
        merger.apply_method("slerp", [0.5, 0.5])
    with pytest.raises(DemError, match="density 2.0 must be in"):
        merger.apply_method("ties", [0.5, 0.5], density=2.0)


def _flat(w, step):  # the gradient strategy's derivative where the objective is flat
    return 0.0, dict.fromkeys(w, 0.0)


@pytest.mark.parametrize("strategy", ["grid", "random", "coordinate", "gradient", "tpe"])
@pytest.mark.parametrize("minimize", [True, False])
def test_a_search_never_scores_below_the_best_individual(strategy, minimize):
    # Merges score badly and one individual (w = one-hot on "b") best: a random draw or a
    # coordinate sweep from 1/K would never land on it, so the guard must add it.
    def score(w):
        one_hot = sorted(w.values()) == [0.0, 0.0, 1.0]
        good = {"a": 0.6, "b": 0.9, "c": 0.7}
        value = max(good[k] for k, x in w.items() if x == 1.0) if one_hot else 0.1
        return {"objective": -value if minimize else value}

    options = dict(values=[0.0, 0.4], n_trials=5, minimize=minimize, gradient=_flat, steps=3)
    trials = search_weights(score, ["a", "b", "c"], strategy, **options)
    assert best_weights(trials) == {"a": 0.0, "b": 1.0, "c": 0.0}
    off = search_weights(score, ["a", "b", "c"], strategy, include_individuals=False, **options)
    assert best_weights(off) != {"a": 0.0, "b": 1.0, "c": 0.0}, "the test scorer is too easy"


def test_the_individual_candidates_are_the_fine_tuned_models_exactly():
    base, a, b = (_tiny_llama(s) for s in (0, 1, 2))
    tuned = {"a": a, "b": b}
    tokens = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(0))

    def loss(model):
        with torch.no_grad():
            return float(model(input_ids=tokens, labels=tokens).loss)

    individual = {name: loss(model) for name, model in tuned.items()}
    merger = InMemoryMerge(base, {n: _vector(base, m) for n, m in tuned.items()})

    def score(w):
        merger.apply(w)
        return {"objective": loss(merger.model)}

    trials = search_weights(score, ["a", "b"], "random", n_trials=3, seed=0)
    scored = {tuple(r[["w_a", "w_b"]]): r.objective for _, r in trials.iterrows()}
    assert scored[(1.0, 0.0)] == pytest.approx(individual["a"], abs=1e-5)
    assert scored[(0.0, 1.0)] == pytest.approx(individual["b"], abs=1e-5)
    assert trials.objective.iloc[0] <= min(individual.values()) + 1e-5


def test_set_merge_runs_the_named_method_with_its_options():
    base, a, b = (_tiny_llama(s) for s in (0, 1, 2))
    merger = InMemoryMerge(base, {"a": _vector(base, a), "b": _vector(base, b)})

    def merged(how, method, **options):
        getattr(merger, how)(method, [0.5, 0.5], **options)
        return [p.detach().clone() for p in base.parameters()]

    def same(x, y):
        return all(torch.equal(p, q) for p, q in zip(x, y, strict=True))

    ties = merged("apply_method", "ties", density=0.5)
    assert same(merged("set_merge", "ties", density=0.5), ties)
    # without options: still TIES (at its default density), not DEM
    ties_default = merged("apply_method", "ties")
    assert same(merged("set_merge", "ties"), ties_default) and not same(ties_default, ties)
    merger.apply([0.5, 0.5])
    dem = [p.detach().clone() for p in base.parameters()]
    assert same(merged("set_merge", "dem"), dem) and not same(dem, ties_default)
