"""The chapters' experiments (dem.experiments): λ search, landscape, baselines, DMix choice,
swap record and the exactness checks, on stand-in scorers and tiny models."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dem import experiments
from dem.data import build_tiny_tokenizer
from dem.models import build_tiny_model, save_model
from dem.vectors import extract_vector, load_vector

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


def test_lambda_search_gives_every_source_the_same_weight_and_passes_the_method(monkeypatch):
    calls = {}

    def fake_scorer(merger, tokenizer, sources, **options):
        calls["options"] = options

        def score(w):
            assert len(set(w.values())) == 1 and set(w) == {"a", "b"}
            return {"objective": abs(w["a"] - 0.5)}

        return score

    monkeypatch.setattr(experiments, "validation_scorer", fake_scorer)
    sources = [type("S", (), {"name": n})() for n in ("a", "b")]
    lam = experiments.lambda_search(None, None, sources, [0.25, 0.5, 1.0], "ties", density=0.2)
    assert lam == 0.5
    assert calls["options"] == {
        "metric": "loss",
        "max_examples": None,
        "batch_size": 64,
        "method": "ties",
        "density": 0.2,
    }


def test_baseline_merges_are_dem_and_the_four_baselines():
    merges = experiments.baseline_merges(
        ["a", "b"], {"a": 1.0, "b": 0.5}, {"task_arithmetic": 0.75, "ties": 1.0, "dare": 0.5},
        ties_density=0.2, dare_drop_prob=0.3, seed=7,
    )  # fmt: skip
    assert list(merges) == ["dem", "average", "task_arithmetic", "ties", "dare"]
    assert merges["dem"] == ("dem", {"a": 1.0, "b": 0.5}, {})
    assert merges["average"] == ("dem", {"a": 0.5, "b": 0.5}, {})
    assert merges["task_arithmetic"] == ("dem", {"a": 0.75, "b": 0.75}, {})
    assert merges["ties"] == ("ties", {"a": 1.0, "b": 1.0}, {"density": 0.2})
    assert merges["dare"] == ("dare_linear", {"a": 0.5, "b": 0.5}, {"drop_prob": 0.3, "seed": 7})


def test_evaluate_merges_sets_each_merge_before_scoring_it(monkeypatch):
    log = []

    class Merger:
        model = "model"

        def apply(self, w):
            log.append(("apply", w))

        def apply_method(self, method, w, **options):
            log.append((method, w, options))

    def fake_evaluate(model, tokenizer, sources, split, *, model_name, **kwargs):
        log.append(("evaluate", model_name, split))
        return pd.DataFrame([{"model": model_name, "source": "a", "metric": "loss", "value": 1.0}])

    monkeypatch.setattr(experiments, "evaluate", fake_evaluate)
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
