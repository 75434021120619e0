"""Gradient weight search: the derivative of the validation loss with respect to the merge
weights is exact (against finite differences), per source and per block of layers, and the
strategy descends it inside its box while choosing among its points by the search metric."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dem import DemError
from dem.chapters import experiments
from dem.evaluation.evaluate import response_loss
from dem.search.gradient import fit_batches, tensor_blocks
from dem.search.weights import InMemoryMerge, best_weights, search_weights, validation_scorer
from dem.sources import get_source
from dem.sources.data import IGNORE_INDEX, build_tiny_tokenizer


def _llama(seed: int, vocab: int = 40) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=True, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config)


def _gpt2(seed: int, vocab: int = 40) -> GPT2LMHeadModel:
    # float64 throughout (Llama's RMSNorm computes in float32, which would blur the check)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    return GPT2LMHeadModel(config)


def _merger(vocab: int = 40, dtype=torch.float64, model=_llama) -> InMemoryMerge:
    """A base and two small-delta 'fine-tunes' (the paper's regime: v_i a fraction of θ0)."""
    base = model(0, vocab).to(dtype)
    vectors = {}
    for i, name in enumerate(["a", "b"], start=1):
        other = model(i, vocab).state_dict()
        vectors[name] = {
            k: 0.3 * (other[k].to(dtype) - v)
            for k, v in base.state_dict().items()
            if v.is_floating_point()
        }
    return InMemoryMerge(base, vectors)


def _batches() -> dict[str, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("x", "y"):
        batches = []
        for _ in range(2):
            ids = torch.randint(1, 40, (3, 10), generator=g)
            labels = ids.clone()
            labels[:, :4] = IGNORE_INDEX  # the prompt is not scored
            labels[0, -2:] = IGNORE_INDEX  # nor padding
            mask = torch.ones_like(ids)
            mask[0, -2:] = 0
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        out[name] = batches
    return out


@pytest.mark.parametrize("granularity", ["source", "layer"])
def test_the_derivative_matches_finite_differences(granularity):
    merger, batches = _merger(model=_gpt2), _batches()
    assert merger.blocks == ["embed", "layer0", "layer1", "head"]
    names = merger.weight_names(granularity)
    w = {n: 0.3 + 0.1 * i for i, n in enumerate(names)}
    _, grads = merger.loss_and_gradient(w, batches)
    h = 1e-5
    for n in names:
        up, _ = merger.loss_and_gradient({**w, n: w[n] + h}, batches)
        down, _ = merger.loss_and_gradient({**w, n: w[n] - h}, batches)
        numeric = (up - down) / (2 * h)
        assert grads[n] == pytest.approx(numeric, rel=1e-5, abs=1e-8), n
    assert any(abs(g) > 1e-4 for g in grads.values()), "a vanishing derivative checks nothing"


def test_per_layer_weights_merge_each_block_with_its_own_weight():
    merger = _merger()
    assert merger.blocks == ["embed", "layer0", "layer1", "head"]
    blocks = tensor_blocks(merger.params)
    assert blocks["model.layers.1.mlp.up_proj.weight"] == "layer1"
    assert blocks["model.embed_tokens.weight"] == "embed" and blocks["model.norm.weight"] == "head"
    w = {n: 0.1 * i for i, n in enumerate(merger.weight_names("layer"))}
    merger.apply(w)
    for name, p in merger.params.items():
        b = blocks[name]
        expected = (merger.theta_base[name] + w[f"a@{b}"] * merger.vectors["a"][name]
                    + w[f"b@{b}"] * merger.vectors["b"][name])  # fmt: skip
        torch.testing.assert_close(p.detach().double(), expected.double(), rtol=0, atol=1e-6)
    # the same value in every block is the per-source merge
    merger.apply({f"{s}@{b}": x for s, x in (("a", 0.4), ("b", 0.7)) for b in merger.blocks})
    per_block = {n: p.detach().clone() for n, p in merger.params.items()}
    merger.apply({"a": 0.4, "b": 0.7})
    assert all(torch.equal(p, per_block[n]) for n, p in merger.params.items())
    # a block left out has weight 0 there: only layer 1 moves
    merger.apply({"a@layer1": 0.5})
    for name, p in merger.params.items():
        v = merger.vectors["a"][name] if blocks[name] == "layer1" else 0
        torch.testing.assert_close(p.detach(), merger.theta_base[name] + 0.5 * v, rtol=0, atol=0)
    assert merger.weight_names() == merger.weight_names("source") == ["a", "b"]
    with pytest.raises(DemError, match="unknown source@block"):
        merger.apply({"a@layer9": 1.0})
    with pytest.raises(DemError, match="unknown granularity 'tensor'; choose one of source, layer"):
        merger.weight_names("tensor")


def test_the_objective_is_the_validation_loss_the_scorer_reports():
    tokenizer = build_tiny_tokenizer()
    merger = _merger(vocab=len(tokenizer), dtype=torch.float32)
    sources = [get_source("arithmetic"), get_source("word_edit")]
    examples = {s.name: s.examples("validation")[:12] for s in sources}
    batches = fit_batches(tokenizer, sources, examples, batch_size=5, max_length=128)
    w = {"a": 0.5, "b": 0.25}
    loss, _ = merger.loss_and_gradient(w, batches)
    merger.apply(w)
    expected = sum(response_loss(merger.model, tokenizer, examples[s.name]) for s in sources) / 2
    assert loss == pytest.approx(expected, rel=1e-5)


def test_gradient_strategy_descends_in_its_box_and_selects_by_the_search_metric():
    target = {"a": 0.8, "b": 1.7, "c": -0.4}  # b and c lie outside the box [0, 1.5]
    scored = []

    def gradient(w, step=0):
        return sum((w[k] - target[k]) ** 2 for k in w), {k: 2 * (w[k] - target[k]) for k in w}

    def score(w):  # the selection metric: here the same bowl, as accuracy it would be -loss
        scored.append(dict(w))
        return {"objective": gradient(w)[0]}

    trials = search_weights(score, list(target), "gradient", gradient=gradient, steps=300,
                            lr=0.05, low=0.0, high=1.5, select_every=100)  # fmt: skip
    best = best_weights(trials)
    assert best == pytest.approx({"a": 0.8, "b": 1.5, "c": 0.0}, abs=0.02)
    path = trials.attrs["gradient_path"]
    assert list(path["step"]) == list(range(300))
    assert path["loss"].iloc[-1] < path["loss"].iloc[0]
    assert path[[f"w_{k}" for k in target]].stack().between(0.0, 1.5).all()
    # scored: the start (1/3 each), steps 100, 200, 300, then the 3 individuals -- nothing else
    assert len(scored) == len(trials) == 1 + 3 + 3
    assert scored[0] == pytest.approx(dict.fromkeys(target, 1 / 3))
    assert scored[4:] == [{"a": 1.0, "b": 0.0, "c": 0.0}, {"a": 0.0, "b": 1.0, "c": 0.0},
                          {"a": 0.0, "b": 0.0, "c": 1.0}]  # fmt: skip
    with pytest.raises(DemError, match="needs gradient"):
        search_weights(score, ["a"], "gradient")
    with pytest.raises(DemError, match="steps >= 1"):
        search_weights(score, ["a"], "gradient", gradient=gradient, steps=0)


def test_gradient_strategy_with_per_layer_weights_on_a_model():
    merger, batches = _merger(), _batches()
    names = merger.weight_names("layer")

    def score(w):
        merger.apply(w)
        return {"objective": merger.loss_and_gradient(w, batches)[0]}

    trials = search_weights(score, names, "gradient", gradient=lambda w, step: merger.loss_and_gradient(
        w, batches), steps=20, lr=0.05, high=1.5, select_every=10)  # fmt: skip
    path = trials.attrs["gradient_path"]
    assert path["loss"].iloc[-1] < path["loss"].iloc[0]
    individuals = trials[trials[[f"w_{n}" for n in names]].isin([0.0, 1.0]).all(axis=1)]
    assert len(individuals) == 2  # a's blocks all at 1, then b's
    assert trials["objective"].iloc[0] == trials["objective"].min()


def test_a_scorer_answers_a_candidate_it_has_seen_from_memory(monkeypatch):
    import dem.evaluation.evaluate

    tokenizer = build_tiny_tokenizer()
    merger = _merger(vocab=len(tokenizer), dtype=torch.float32)
    sources = [get_source("arithmetic", n_validation=6)]
    calls = []
    real = dem.evaluation.evaluate.evaluate
    monkeypatch.setattr(
        dem.evaluation.evaluate, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    score = validation_scorer(merger, tokenizer, sources)  # metric: the loss by default
    started = time.perf_counter()
    first = score({"a": 0.5, "b": 0.25})
    elapsed = time.perf_counter() - started
    again = score({"b": 0.25, "a": 0.5})  # the same candidate
    other = score({"a": 0.5, "b": 0.0})
    assert len(calls) == 2 and "loss/arithmetic" in first
    assert 0 < first["merge_s"] and 0 < first["eval_s"]
    assert first["merge_s"] + first["eval_s"] <= elapsed  # two parts of the call's time
    assert again["objective"] == first["objective"] and again["eval_s"] == again["merge_s"] == 0
    assert other["objective"] != first["objective"]


def test_adamerging_fits_on_its_own_examples_and_selects_on_the_selection_examples(monkeypatch):
    import dem.evaluation.evaluate
    import dem.search.gradient

    tokenizer = build_tiny_tokenizer()
    merger = _merger(vocab=len(tokenizer), dtype=torch.float32)
    sources = [get_source(n, n_validation=12) for n in ("arithmetic", "word_edit")]
    scored, fitted = [], []
    evaluate, fit_batches = dem.evaluation.evaluate.evaluate, dem.search.gradient.fit_batches

    def scoring(model, tok, srcs, split, **options):
        scored.append((split, options["max_examples"]))
        return evaluate(model, tok, srcs, split, **options)

    def fitting(tok, srcs, examples, **options):
        fitted.append(examples)
        return fit_batches(tok, srcs, examples, **options)

    monkeypatch.setattr(dem.evaluation.evaluate, "evaluate", scoring)
    monkeypatch.setattr(dem.search.gradient, "fit_batches", fitting)
    score = validation_scorer(merger, tokenizer, sources, metric="loss", max_examples=4)
    trials = experiments.adamerging_search(merger, tokenizer, sources, score, steps=20, lr=0.05,
                                           minibatch=2, max_examples=4, max_length=64)  # fmt: skip
    # fit on validation examples 4-7, score every candidate on examples 0-3 only
    assert fitted == [{s.name: s.examples("validation")[4:8] for s in sources}]
    assert set(scored) == {("validation", 4)} and not trials.attrs["fit_overlaps_selection"]
    path, names = trials.attrs["gradient_path"], merger.weight_names("layer")
    assert len(path) == 20 and (path[[f"w_{n}" for n in names]].iloc[0] == 0.3).all()
    assert path[[f"w_{n}" for n in names]].stack().between(0.0, 1.0).all()
    assert not path[[f"w_{n}" for n in names]].iloc[-1].eq(0.3).all(), "the weights never moved"
    # scored: the start, every second step (a tenth of 20), the 2 individuals
    assert len(trials) == 1 + 10 + 2 and trials.attrs["granularity"] == "layer"
    best = {n: trials[f"w_{n}"].iloc[0] for n in names}
    merger.apply(best)
    selection = [
        response_loss(merger.model, tokenizer, s.examples("validation")[:4]) for s in sources
    ]
    assert trials["objective"].iloc[0] == pytest.approx(sum(selection) / 2, rel=1e-5)
    assert trials["objective"].iloc[0] == trials["objective"].min()


def test_a_scorer_merges_with_the_method_and_options_it_is_given():
    tokenizer = build_tiny_tokenizer()
    merger = _merger(vocab=len(tokenizer), dtype=torch.float32)
    sources = [get_source("arithmetic", n_validation=6)]
    with pytest.raises(
        DemError, match="unknown search metric 'bleu'; choose one of loss, accuracy"
    ):
        validation_scorer(merger, tokenizer, sources, metric="bleu")
    dem = validation_scorer(merger, tokenizer, sources)
    scaled = validation_scorer(merger, tokenizer, sources, method="task_arithmetic", lam=0.5)
    w = {"a": 0.6, "b": 0.2}
    # λ·Σ w_i·v_i is DEM at the weights times λ; a candidate's own λ overrides the scorer's
    halved = dem({"a": 0.3, "b": 0.1})["objective"]
    assert scaled(w)["objective"] == pytest.approx(halved, rel=1e-6)
    assert scaled(w, lam=0.0)["objective"] == pytest.approx(dem({"a": 0, "b": 0})["objective"])
    assert scaled(w, lam=1.0)["objective"] == pytest.approx(dem(w)["objective"], rel=1e-6)
