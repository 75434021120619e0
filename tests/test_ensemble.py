"""The output ensemble (MDE): its next-token distribution is the weighted mixture of its
members', and every evaluation the chapters run (loss, greedy generation with KV caches,
multiple choice) scores it like a model."""

from __future__ import annotations

import math

import pytest
import torch

from dem import DemError
from dem.chapters.experiments import ensemble_search
from dem.evaluation.evaluate import evaluate, generate_answers, response_loss
from dem.models import build_tiny_model
from dem.search.ensemble import Ensemble
from dem.sources import get_source
from dem.sources.data import build_tiny_tokenizer, encode_prompts

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 96}


@pytest.fixture(scope="module")
def parts():
    tokenizer = build_tiny_tokenizer()
    members = [build_tiny_model(tokenizer, seed=s, **TINY).eval() for s in (1, 2, 3)]
    return tokenizer, members


def test_the_next_token_distribution_is_the_weighted_mixture(parts):
    tokenizer, members = parts
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    ensemble = Ensemble(members, [2.0, 0.0, 1.0])
    assert ensemble.forward_passes == 2  # a weight of 0 costs nothing
    with torch.no_grad():
        got = ensemble(input_ids=ids).logits.double().exp()
        p = [m(input_ids=ids).logits.double().softmax(-1) for m in members]
    torch.testing.assert_close(got, (2 * p[0] + p[2]) / 3, rtol=1e-5, atol=1e-7)
    # The mixture is computed in float32: its sum over the vocabulary carries float32's rounding
    # (a few eps per term in the worst order), not float64's.
    vocab_eps = len(tokenizer) * torch.finfo(torch.float32).eps
    torch.testing.assert_close(
        got.sum(-1), torch.ones(2, 9, dtype=torch.float64), rtol=0, atol=vocab_eps
    )


def test_a_one_member_ensemble_scores_as_that_member(parts):
    tokenizer, members = parts
    source = get_source("arithmetic", n_validation=12)
    examples = source.examples("validation")
    alone = Ensemble(members, [0.0, 1.0, 0.0])
    assert response_loss(alone, tokenizer, examples) == pytest.approx(
        response_loss(members[1], tokenizer, examples), rel=1e-5)  # fmt: skip
    assert generate_answers(alone, tokenizer, source, examples) == generate_answers(
        members[1], tokenizer, source, examples)  # fmt: skip


def test_greedy_generation_with_caches_takes_the_mixtures_argmax(parts):
    tokenizer, members = parts
    source = get_source("word_edit", n_validation=6).with_max_new_tokens(6)
    examples = source.examples("validation")
    ensemble = Ensemble(members, [1.0, 1.0, 1.0])
    cached = generate_answers(ensemble, tokenizer, source, examples, batch_size=4)
    # the reference decodes one example at a time, recomputing the whole prefix each step
    expected = []
    for ex in examples:
        ids = encode_prompts(tokenizer, [ex.prompt])[0]
        out = []
        with torch.no_grad():
            for _ in range(source.max_new_tokens):
                token = int(ensemble(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                out.append(token)
        expected.append(tokenizer.decode(out, skip_special_tokens=True))
    assert cached == expected


def test_the_ensemble_loss_is_the_mixtures_cross_entropy(parts):
    tokenizer, members = parts
    examples = get_source("facts", n_validation=8).examples("validation")
    losses = [response_loss(m, tokenizer, examples) for m in members]
    mixed = response_loss(Ensemble(members, [1, 1, 1]), tokenizer, examples)
    # -log of an average of probabilities is at most the average of -logs (Jensen), and above
    # the best member's loss minus log K
    assert mixed <= sum(losses) / 3 + 1e-6
    assert mixed >= min(losses) - math.log(3) - 1e-6


def test_bad_weights_are_clear_errors(parts):
    _, members = parts
    with pytest.raises(DemError, match="non-negative with a positive sum"):
        Ensemble(members, [0.0, 0.0, 0.0])
    with pytest.raises(DemError, match="non-negative"):
        Ensemble(members, [1.0, -1.0, 1.0])
    with pytest.raises(DemError, match="3 models but 2 weights"):
        Ensemble(members, [1.0, 1.0])


def test_ensemble_search_selects_on_validation_and_includes_the_individuals(parts):
    tokenizer, members = parts
    sources = [get_source(n, n_validation=6) for n in ("arithmetic", "facts", "word_edit")]
    trials = ensemble_search(members, tokenizer, sources, values=[0.0, 1.0], metric="loss")
    weights = trials[[f"w_{s.name}" for s in sources]]
    for i in range(3):  # each member alone
        assert ((weights == 0) | (weights == 1)).all(axis=1).any()
        assert (weights.values == [float(i == j) for j in range(3)]).all(axis=1).any()
    assert trials["objective"].is_monotonic_increasing
    table = evaluate(members[0], tokenizer, sources, "validation", metrics=("loss",))
    first = trials[(weights.values == [1.0, 0.0, 0.0]).all(axis=1)]["objective"].iloc[0]
    assert first == pytest.approx(table[table.metric == "loss"]["value"].mean(), rel=1e-5)
