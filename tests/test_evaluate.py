"""Evaluation: exact loss against a per-example reference, greedy generation against
``model.generate``, accuracy on controlled outputs, the tidy table, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers_data import BigramStub, tiny_model

from dem import DemError
from dem.evaluation.evaluate import (
    accuracy,
    choice_predictions,
    evaluate,
    generate_answers,
    greedy_generate,
    response_loss,
    response_nll,
)
from dem.sources import Example, Source, get_source
from dem.sources.data import IGNORE_INDEX, encode_examples, encode_prompts, format_prompt, pad_batch


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


EXAMPLES = [
    Example("1+1=", "2", "2"),
    Example("What color is Fisal?", "teal", "teal"),
    Example("Ana has 3 pens, gets 4 more and gives away 2. How many pens now?", "#### 5", "5"),
]


def test_response_loss_matches_unbatched_reference(tok, model):
    # Reference: each example alone, no padding, log-softmax by hand in float64.
    total, count = 0.0, 0
    for enc in encode_examples(tok, EXAMPLES, 256):
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for pos, label in enumerate(enc["labels"]):
            if label != -100:
                total -= float(logp[pos - 1, label])
                count += 1
    expected = total / count
    assert count == 1 + 1 + 4 + 1 + 6 + 1  # response chars + eos per example
    for batch_size in (1, 2, 64):  # padding must not change the value
        got = response_loss(model, tok, EXAMPLES, batch_size=batch_size)
        assert got == pytest.approx(expected, rel=1e-5)


def test_response_nll_both_ways_match_the_float64_reference(tok, model):
    """The one response loss: per token (evaluation) and summed (training's validation)."""
    encoded = encode_examples(tok, EXAMPLES, 256)
    batch = pad_batch(encoded, tok.pad_token_id)
    with torch.no_grad():
        logp = torch.log_softmax(
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.double(), -1
        )
        per_token, scored = response_nll(model, batch)
        summed, scored_all = response_nll(model, batch, reduction="sum", skip_prompt=False)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    reference = -logp[:, :-1].gather(-1, target.clamp(min=0)[..., None])[..., 0] * keep
    # skip_prompt drops the leading columns where no row has a response token yet.
    skipped = reference.shape[1] - per_token.shape[1]
    assert skipped > 0 and not keep[:, :skipped].any()
    assert torch.allclose(per_token.double(), reference[:, skipped:], atol=1e-5)
    assert torch.equal(scored, keep[:, skipped:]) and int(scored_all.sum()) == int(keep.sum())
    assert float(summed) == pytest.approx(float(reference.sum()), rel=1e-5)
    assert float(per_token[~scored].abs().sum()) == 0.0


def test_greedy_generate_matches_transformers_generate(tok, model):
    prompts = [e.prompt for e in get_source("arithmetic_cot").examples("test")[:6]]
    prompts += ["1+1=", "[reverse] abc"]  # very different lengths: left padding matters
    mine = greedy_generate(model, encode_prompts(tok, prompts), 12, tok.eos_token_id, 0)
    for prompt, got in zip(prompts, mine, strict=True):
        enc = tok(format_prompt(tok, prompt), return_tensors="pt")
        out = model.generate(
            **enc,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, enc["input_ids"].shape[1] :].tolist()
        if tok.eos_token_id in out:
            out = out[: out.index(tok.eos_token_id)]
        assert got == out


def _source(**kw):
    return Source(name="stub", description="stub", max_new_tokens=4, **kw)


def test_accuracy_right_is_one_wrong_is_zero(tok):
    # The stub continues the prompt separator's last char " " with "42" then eos.
    stub = BigramStub(tok, {" ": "4", "4": "2", "2": "<eos>"})
    source = _source(extractor="first_number")
    assert generate_answers(stub, tok, source, [Example("40+2=", "42", "42")]) == ["42"]
    assert accuracy(stub, tok, source, [Example("40+2=", "42", "42")]) == 1.0
    assert accuracy(stub, tok, source, [Example("40+1=", "41", "41")]) == 0.0
    mixed = [Example("a", "42", "42"), Example("b", "7", "7")]
    assert accuracy(stub, tok, source, mixed) == 0.5


def test_choice_by_log_likelihood(tok):
    stub = BigramStub(tok, {" ": "B", "B": ".", ".": " ", "y": "<eos>"})
    source = _source(metric="choice", extractor="choice_letter")
    right = Example("Q?\nA. x\nB. y", "B. y", "B", choices=("A. x", "B. y"))
    wrong = Example("Q?\nA. x\nB. y", "A. x", "A", choices=("A. x", "B. y"))
    assert choice_predictions(stub, tok, [right]) == ["B. y"]
    assert accuracy(stub, tok, source, [right]) == 1.0
    assert accuracy(stub, tok, source, [wrong]) == 0.0


def test_evaluate_tidy_deterministic_and_mode_restored(tok, model):
    sources = [get_source("arithmetic"), get_source("facts"), get_source("composite")]
    model.train()
    table = evaluate(model, tok, sources, "validation", ("loss", "accuracy"), max_examples=20)
    assert model.training  # left as found
    model.eval()
    assert list(table.columns) == ["model", "source", "split", "metric", "value"]
    assert len(table) == 3 * 3
    assert set(table.metric) == {"loss", "perplexity", "accuracy"}
    again = evaluate(model, tok, sources, "validation", ("loss", "accuracy"), max_examples=20)
    assert table.equals(again)
    loss = table.query("source == 'facts' and metric == 'loss'").value.item()
    ppl = table.query("source == 'facts' and metric == 'perplexity'").value.item()
    assert ppl == pytest.approx(torch.tensor(loss).exp().item())
    assert table.query("metric == 'accuracy'").value.between(0, 1).all()


def test_evaluate_bad_arguments(tok, model):
    with pytest.raises(DemError, match="unknown metric"):
        evaluate(model, tok, [get_source("arithmetic")], "test", ("bleu",))
    with pytest.raises(DemError, match="max_examples"):
        evaluate(model, tok, [get_source("arithmetic")], "test", max_examples=0)


def test_cli_evaluate_prints_json(tmp_path, tok, model, capsys):
    from dem.cli import main

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    argv = ["evaluate", "--model", str(tmp_path / "m"), "--source", "arithmetic"]
    argv += ["--source", "word_edit", "--split", "test", "--max-examples", "8", "--device", "cpu"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["source"], r["metric"]) for r in rows} == {
        (s, m) for s in ("arithmetic", "word_edit") for m in ("loss", "perplexity", "accuracy")
    }
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--source", "nope"]) == 2
    assert "unknown source 'nope'" in capsys.readouterr().err


def test_cli_evaluate_dtype_chooses_the_scoring_precision(tmp_path, tok, model, capsys):
    from dem import precision
    from dem.cli import main

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    argv = ["evaluate", "--model", str(tmp_path / "m"), "--source", "arithmetic",
            "--metrics", "loss", "--max-examples", "8", "--device", "cpu"]  # fmt: skip
    losses = {}
    try:
        for dtype in ("bfloat16", "auto"):
            assert main([*argv, "--dtype", dtype]) == 0
            out = capsys.readouterr()
            losses[dtype] = json.loads(out.out)[0]["value"]
            # auto on a tiny base on the CPU: float32 (dem/precision.py)
            assert f"scoring in {'bfloat16' if dtype == 'bfloat16' else 'float32'}" in out.err
    finally:
        precision.set_compute_dtype(torch.float32)
    # bf16 rounds the matmuls (8 bits of mantissa): close to float32's loss, not equal to it
    assert losses["bfloat16"] != losses["auto"]
    assert losses["bfloat16"] == pytest.approx(losses["auto"], rel=0.05)
