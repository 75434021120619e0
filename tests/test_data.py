"""Tokenizer, prompt formatting, loss masks, length statistics, bucketing."""

from __future__ import annotations

import warnings

import pytest
import torch

from dem import DemError
from dem.sources import Example, get_source
from dem.sources.data import (
    IGNORE_INDEX,
    PROMPT_SEPARATOR,
    TINY_ALPHABET,
    build_tiny_tokenizer,
    encode_examples,
    encode_prompts,
    format_prompt,
    length_stats,
    make_batches,
    pad_batch,
    padding_fraction,
)


def test_tiny_tokenizer_vocab_is_fixed(tok):
    assert len(tok) == 4 + len(TINY_ALPHABET) == 100
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("\n") == 4 and tok.convert_tokens_to_ids(" ") == 5
    assert tok.chat_template is None


def test_tiny_tokenizer_round_trip_and_unk(tok):
    text = "Ana has 12 pens.\n#### 14 ~{}"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("é")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]


def test_tiny_tokenizer_saved_folder_loads_with_auto(tmp_path, tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    build_tiny_tokenizer(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded("x=1\n")["input_ids"] == tok("x=1\n")["input_ids"]
    assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.startswith(".")]  # no tmp left


def test_format_prompt_plain_and_chat_template(tok):
    assert format_prompt(tok, "2+2=") == "2+2=" + PROMPT_SEPARATOR
    chat = build_tiny_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert format_prompt(chat, "2+2=") == "<user>2+2=\n<assistant>"
    # a template brings its own markers: no bos added on top
    assert encode_prompts(chat, ["2+2="])[0][0] != chat.bos_token_id
    assert encode_prompts(tok, ["2+2="])[0][0] == tok.bos_token_id


def test_loss_mask_exact_on_hand_made_example(tok):
    (enc,) = encode_examples(tok, [Example("1+1=", "2", "2")], max_length=64)
    char = tok.convert_tokens_to_ids
    prompt = [tok.bos_token_id] + [char(c) for c in "1+1=" + PROMPT_SEPARATOR]
    assert enc["input_ids"] == prompt + [char("2"), tok.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX] * len(prompt) + [char("2"), tok.eos_token_id]


def test_too_long_examples_counted_and_reported(tok):
    examples = [Example("a", "b", "b"), Example("a" * 50, "b", "b"), Example("x", "y" * 50, "y")]
    with pytest.warns(UserWarning, match=r"2 of 3 examples are longer than max_length=20"):
        dropped = encode_examples(tok, examples, max_length=20)
    assert len(dropped) == 1
    with pytest.warns(UserWarning, match="truncated"):
        cut = encode_examples(tok, examples, max_length=20, too_long="truncate")
    # the long response is truncated; the long prompt leaves nothing to learn and is dropped
    assert [len(e["input_ids"]) for e in cut] == [len(dropped[0]["input_ids"]), 20]
    with pytest.raises(DemError, match="all 2 examples are longer than max_length=20"):
        encode_examples(tok, examples[1:], max_length=20, name="src")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing too long: no warning at all
        encode_examples(tok, examples[:1], max_length=20)


def test_length_stats_hand_made():
    encoded = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, 4, 5]},
    ]
    stats = length_stats(encoded)
    assert stats["examples"] == 2 and stats["tokens"] == 8 and stats["response_tokens"] == 4
    assert stats["mean_length"] == 4 and stats["max_length"] == 5 and stats["min_length"] == 3


def test_make_batches_deterministic_complete_and_low_padding(tok):
    encoded = []
    for name in ("arithmetic", "arithmetic_cot", "word_edit", "facts"):
        encoded += encode_examples(tok, get_source(name, n_train=500).examples("train"), 128)
    a = make_batches(encoded, 32, tok.pad_token_id, seed=0)
    b = make_batches(encoded, 32, tok.pad_token_id, seed=0)
    c = make_batches(encoded, 32, tok.pad_token_id, seed=1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=False))
    # every example exactly once, and padding positions carry no label
    rows = sorted(
        tuple(r[m.bool()].tolist())
        for batch in a
        for r, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    )
    assert rows == sorted(tuple(e["input_ids"]) for e in encoded)
    for batch in a:
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert padding_fraction(a) <= 0.10


def test_padding_fraction_hand_made():
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert padding_fraction([batch]) == pytest.approx(0.25)
    assert padding_fraction([]) == 0.0


def test_pad_batch_hand_made_keeps_row_order():
    rows = [
        {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]},
        {"input_ids": [1, 7], "labels": [-100, 7]},
    ]
    batch = pad_batch(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())
