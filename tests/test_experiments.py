"""The chapters' experiments (dem.chapters.experiments): λ search, landscape, baselines, DMix choice,
swap record and the exactness checks, on stand-in scorers and tiny models."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dem import DemError
from dem.chapters import experiments
from dem.merging.vectors import extract_vector, load_vector
from dem.models import build_tiny_model, load_model, save_model
from dem.search import baselines
from dem.search.weights import InMemoryMerge
from dem.sources.data import build_tiny_tokenizer

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 64}


def test_search_cost_sums_the_trials():
    trials = pd.DataFrame({"merge_s": [0.1, 0.3], "eval_s": [1.0, 3.0]})
    cost = experiments.search_cost(trials)
    assert cost == {"candidates": 2, "wall_s": pytest.approx(4.4), "merge_overhead": 0.1}


def test_landscape_varies_two_weights_and_holds_the_others():
    seen = []

    def score(w):
        seen.append(dict(w))
        return {"objective": (w["a"] - 1) ** 2 + (w["b"] - 0.5) ** 2}

    trials = experiments.landscape(score, {"a": 0.0, "b": 0.0, "c": 0.7}, "a", "b", [0.0, 0.5, 1.0])
    assert len(trials) == 9 and all(w["c"] == 0.7 for w in seen)
    assert trials.iloc[0][["w_a", "w_b"]].tolist() == [1.0, 0.5]


@pytest.mark.parametrize(
    ("method", "weights_of", "options_of"),
    [
        # task arithmetic and DARE add w_i·v_i: λ is every weight
        ("dem", lambda lam: {"a": lam, "b": lam}, lambda lam: {}),
        ("dare_linear", lambda lam: {"a": lam, "b": lam}, lambda lam: {"drop_prob": 0.3}),
        # TIES divides by Σ w_i: λ is its own scale, every weight 1
        ("ties", lambda lam: {"a": 1.0, "b": 1.0}, lambda lam: {"density": 0.2, "lam": lam}),
    ],
)
def test_lambda_search_puts_lambda_where_the_method_scales_by_it(
    monkeypatch, method, weights_of, options_of
):
    seen = []
    given = {"dare_linear": {"drop_prob": 0.3}, "ties": {"density": 0.2}}.get(method, {})

    def fake_scorer(merger, tokenizer, sources, *, metric, max_examples, batch_size, method):
        def score(w, **options):
            seen.append((dict(w), options))
            lam = options.get("lam", w["a"])
            return {"objective": abs(lam - 0.5)}

        return score

    monkeypatch.setattr(baselines, "validation_scorer", fake_scorer)
    sources = [type("S", (), {"name": n})() for n in ("a", "b")]
    lam = experiments.lambda_search(None, None, sources, [0.25, 0.5, 1.0], method, **given)
    assert lam == 0.5
    assert seen == [(weights_of(x), options_of(x)) for x in (0.25, 0.5, 1.0)]


def test_ties_lambda_changes_the_merge_and_equals_the_streaming_merge(tmp_path):
    """The λ chosen for TIES must reach the model: with the weights normalised away, a λ given
    as equal weights would leave every candidate the same merge."""
    from dem.merging.merge import merge
    from dem.search.weights import InMemoryMerge

    tokenizer = build_tiny_tokenizer()
    base = save_model(_model(0), tokenizer, tmp_path / "base")
    fts = []
    for s in (1, 2):
        tuned, g = _model(0), torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.01)
        fts.append(save_model(tuned, tokenizer, tmp_path / f"ft{s}"))
    model, _ = load_model(base)
    merger = InMemoryMerge(
        model, {f"ft{s}": load_vector(extract_vector(base, ft, tmp_path / f"v{s}", progress=False))
                for s, ft in zip((1, 2), fts, strict=True)},
    )  # fmt: skip
    names = ["ft1", "ft2"]
    merged = {}
    for lam in (0.25, 1.0):
        lams = {"task_arithmetic": 1.0, "ties": lam, "dare": 1.0}
        merges = experiments.baseline_merges(names, {}, lams, ties_density=0.2,
                                             dare_drop_prob=0.5, seed=0)  # fmt: skip
        method, weights, options = merges["ties"]
        merger.apply_method(method, weights, **options)
        merged[lam] = {n: p.detach().clone() for n, p in model.named_parameters()}
        streamed = merge(base, [(ft, 1.0) for ft in fts], tmp_path / f"ties{lam}", method="ties",
                         density=0.2, lam=lam, progress=False)  # fmt: skip
        assert experiments.max_abs_difference(load_model(streamed)[0], model) <= 1e-6
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[0.25][name], merged[1.0][name])


def test_baseline_merges_are_dem_and_the_baselines():
    merges = experiments.baseline_merges(
        ["a", "b"], {"a": 1.0, "b": 0.5},
        {"task_arithmetic": 0.75, "ties": 1.0, "dare": 0.5, "breadcrumbs": 0.25, "della": 0.5},
        ties_density=0.2, dare_drop_prob=0.3, seed=7, more=experiments.MORE_MERGES,
    )  # fmt: skip
    assert list(merges) == ["dem", "average", "task_arithmetic", "ties", "dare", "breadcrumbs",
                            "della", "model_stock"]  # fmt: skip
    assert merges["dem"] == ("dem", {"a": 1.0, "b": 0.5}, {})
    assert merges["average"] == ("dem", {"a": 0.5, "b": 0.5}, {})
    assert merges["task_arithmetic"] == ("dem", {"a": 0.75, "b": 0.75}, {})
    assert merges["ties"] == ("ties", {"a": 1.0, "b": 1.0}, {"density": 0.2, "lam": 1.0})
    assert merges["dare"] == ("dare_linear", {"a": 0.5, "b": 0.5}, {"drop_prob": 0.3, "seed": 7})
    assert merges["breadcrumbs"] == ("breadcrumbs", {"a": 1.0, "b": 1.0}, {"lam": 0.25})
    assert merges["della"] == ("della", {"a": 1.0, "b": 1.0}, {"seed": 7, "lam": 0.5})
    assert merges["model_stock"] == ("model_stock", {"a": 0.5, "b": 0.5}, {})


def test_evaluate_merges_sets_each_merge_before_scoring_it(monkeypatch):
    log = []

    class Merger:
        model = "model"

        def apply(self, w):
            log.append(("apply", w))

        def apply_method(self, method, w, **options):
            log.append((method, w, options))

        set_merge = InMemoryMerge.set_merge

    def fake_evaluate(model, tokenizer, sources, split, *, model_name, **kwargs):
        log.append(("evaluate", model_name, split))
        return pd.DataFrame([{"model": model_name, "source": "a", "metric": "loss", "value": 1.0}])

    monkeypatch.setattr(baselines, "evaluate", fake_evaluate)
    merges = {"dem": ("dem", {"a": 1.0}, {}), "ties": ("ties", {"a": 0.5}, {"density": 0.2})}
    table = experiments.evaluate_merges(Merger(), None, merges, [])
    assert log == [
        ("apply", {"a": 1.0}),
        ("evaluate", "dem", "test"),
        ("ties", {"a": 0.5}, {"density": 0.2}),
        ("evaluate", "ties", "test"),
    ]
    assert list(table.model) == ["dem", "ties"]


def test_choose_mixture_minimises_a_loss_and_maximises_an_accuracy():
    validation = pd.DataFrame(
        {"model": ["m1", "m1", "m2", "m2"], "source": list("abab"), "value": [0.2, 0.4, 0.5, 0.5]}
    )
    scores, best = experiments.choose_mixture(validation, "loss")
    assert best == "m1" and scores.to_dict() == pytest.approx({"m1": 0.3, "m2": 0.5})
    assert experiments.choose_mixture(validation, "accuracy")[1] == "m2"


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_choose_mixture_breaks_ties_by_the_grids_order(metric):
    """The same per-source scores in another order tie even where their float means differ in
    the last bit; the first run of the table wins, whichever way round the table lists them."""
    high, low = [0.33, 0.65, 0.62, 0.515], [0.65, 0.33, 0.62, 0.515]  # k/200 accuracies
    other = [0.1] * 4 if metric == "accuracy" else [0.9] * 4
    rows = {"2-1-1-1": high, "1-2-1-1": low, "1-1-1-1": other}
    for order in (["2-1-1-1", "1-2-1-1", "1-1-1-1"], ["1-1-1-1", "1-2-1-1", "2-1-1-1"]):
        validation = pd.DataFrame(
            [{"model": m, "source": s, "value": v}
             for m in order for s, v in zip("wxyz", rows[m], strict=True)]
        )  # fmt: skip
        scores, best = experiments.choose_mixture(validation, metric)
        assert scores["2-1-1-1"] != scores["1-2-1-1"]  # summation order alone moved the mean
        assert best == [m for m in order if m != "1-1-1-1"][0]
    # one example more (of 200) on one source is not a tie
    better = 0.005 if metric == "accuracy" else -0.005
    validation.loc[(validation.model == "2-1-1-1") & (validation.source == "w"), "value"] += better
    assert experiments.choose_mixture(validation, metric)[1] == "2-1-1-1"


def test_swap_record_is_plain_json_of_weights_scores_and_costs():
    cost = pd.DataFrame(
        [
            {"recipe": "DEM", "train_tokens": 10, "wall_s": 1.5},
            {"recipe": "DMix", "train_tokens": 40, "wall_s": 9.0},
        ]
    ).set_index("recipe")
    test = pd.DataFrame({"model": ["dem_swapped"] * 2, "source": ["a", "c"], "value": [0.5, 1.0]})
    swap = experiments.SwapResult("b", "c", {"a": 1.0, "c": 0.5}, test, cost)
    assert swap.record() == {
        "out": "b",
        "in": "c",
        "weights": {"a": 1.0, "c": 0.5},
        "test": {"a": 0.5, "c": 1.0},
        "cost": {
            "DEM": {"train_tokens": 10, "wall_s": 1.5},
            "DMix": {"train_tokens": 40, "wall_s": 9.0},
        },
    }


def _model(seed: int):
    torch.manual_seed(seed)
    return build_tiny_model(build_tiny_tokenizer(), **TINY)


def test_reconstruction_error_of_an_extracted_vector_is_zero_and_sees_a_change(tmp_path):
    tokenizer = build_tiny_tokenizer()
    base = save_model(_model(0), tokenizer, tmp_path / "base")
    tuned = _model(0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.25)
    ft = save_model(tuned, tokenizer, tmp_path / "ft")
    v = load_vector(extract_vector(base, ft, tmp_path / "v", progress=False))
    assert experiments.reconstruction_error(base, ft, v) < 1e-6
    name = next(iter(v))
    v[name] = v[name].clone()
    v[name].view(-1)[0] += 0.5
    assert experiments.reconstruction_error(base, ft, v) == pytest.approx(0.5)


def test_max_abs_difference_of_two_models():
    a, b = _model(0), _model(0)
    assert experiments.max_abs_difference(a, b) == 0.0
    with torch.no_grad():
        next(b.parameters()).view(-1)[3] -= 0.125
    assert experiments.max_abs_difference(a, b) == 0.125


def test_where_a_shared_lambda_goes_is_the_methods_own_rule():
    from dem.merging.methods import METHODS

    assert METHODS["ties"].shared_scale == METHODS["della"].shared_scale == "lam"
    assert METHODS["dem"].shared_scale == METHODS["dare_linear"].shared_scale == "weights"
    assert METHODS["model_stock"].shared_scale is None
    with pytest.raises(baselines.DemError, match="model_stock.*own scale"):
        baselines.shared_lambda("model_stock", ["a", "b"], 0.5)
    with pytest.raises(baselines.DemError, match="no λ given for the baseline 'dare'"):
        experiments.baseline_merges(["a"], {"a": 1.0}, {"task_arithmetic": 1.0, "ties": 1.0},
                                    ties_density=0.2, dare_drop_prob=0.5, seed=0)  # fmt: skip


def test_a_scorer_remembers_each_candidate_with_its_options(monkeypatch):
    """One scorer serves a whole λ search: the options are part of the candidate."""
    from dem.search import weights as search

    calls = []

    class Merger:
        model = torch.nn.Linear(1, 1)

        def set_merge(self, method, w, **options):
            calls.append((method, dict(w), options))

    def fake_evaluate(model, tokenizer, sources, split, *, metrics, **kwargs):
        return pd.DataFrame([{"source": "a", "metric": "accuracy", "value": 0.5}])

    monkeypatch.setattr("dem.evaluation.evaluate.evaluate", fake_evaluate)
    score = search.validation_scorer(Merger(), None, [], metric="accuracy", method="ties",
                                     density=0.2)  # fmt: skip
    for lam in (0.5, 1.0, 0.5):
        assert score({"a": 1.0}, lam=lam)["objective"] == 0.5
    assert calls == [("ties", {"a": 1.0}, {"density": 0.2, "lam": 0.5}),
                     ("ties", {"a": 1.0}, {"density": 0.2, "lam": 1.0})]  # fmt: skip


def test_dem_guided_mixture_is_the_normalized_dem_weights():
    w = {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.5}
    assert experiments.dem_guided_mixture(w) == {"a": 0.5, "b": 0.25, "c": 0.0, "d": 0.25}
    assert experiments.dem_guided_mixture({"a": 0.0, "b": 0.0}) is None  # DEM chose the base
    with pytest.raises(DemError, match="must be a finite number >= 0"):
        experiments.dem_guided_mixture({"a": -0.5, "b": 1.0})
