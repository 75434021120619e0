"""From examples to training batches: the tiny tokenizer, prompt formatting, loss masks, bucketing.

The tiny default model reads characters: :func:`build_tiny_tokenizer` makes a character-level
``PreTrainedTokenizerFast`` with the `tokenizers` library, saved as an ordinary tokenizer
folder, so the tiny model is a plain Hugging Face model like any other. Any other tokenizer
(e.g. SmolLM2-Instruct's, with its chat template) works with the same functions.
"""

from __future__ import annotations

import random
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dem import DemError
from dem.io import write_bytes

if TYPE_CHECKING:  # heavy imports stay lazy: ``import dem.sources.data`` is cheap
    import torch
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    from dem.sources.core import Example

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
# Printable ASCII and newline: every built-in source and most English text; the order is fixed
# so that token ids (and therefore trained weights) never depend on the data.
TINY_ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
# Between prompt and response for tokenizers without a chat template. A fixed, rare marker
# tells the model where the answer starts; a plain newline would clash with multi-line prompts.
PROMPT_SEPARATOR = "\n=> "
IGNORE_INDEX = -100  # label value ignored by the cross-entropy loss of transformers/torch


def build_tiny_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then printable ASCII.

    Encoding adds <bos> in front; unknown characters map to <unk>. Saved (atomically per
    file) as an ordinary tokenizer folder when ``out_dir`` is given.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + list(TINY_ALPHABET))}
    # BPE with no merges and no pre-tokenizer = one token per character, whitespace included.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(specials)
    core.decoder = decoders.Fuse()  # join characters back without inserted spaces
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, model_max_length=1024, padding_side="right", **SPECIAL_TOKENS
    )
    if out_dir is not None:
        _save_tokenizer(tokenizer, Path(out_dir))
    return tokenizer


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    # Save into a scratch folder, then write each file into place atomically, so an
    # interrupted save never leaves a half-written tokenizer.json behind.
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tokenizer-", dir=out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            write_bytes(out_dir / f.name, f.read_bytes())


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text the model sees before its response.

    With a chat template (instruct models): the prompt as the user turn, plus the assistant
    header (``add_generation_prompt=True``). Without one: the prompt plus ``PROMPT_SEPARATOR``.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + PROMPT_SEPARATOR


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of formatted prompts (special tokens added only when there is no template).

    Chat templates already contain their own begin-of-text markers, so adding the tokenizer's
    special tokens on top would duplicate them.
    """
    texts = [format_prompt(tokenizer, p) for p in prompts]
    add_special = not getattr(tokenizer, "chat_template", None)
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    *,
    too_long: str = "drop",
    name: str = "examples",
) -> list[dict[str, list[int]]]:
    """``{"input_ids", "labels"}`` per example; the loss falls on response tokens and eos only.

    ``too_long`` ("drop" or "truncate"): what happens to examples over ``max_length`` tokens;
    either way they are counted and reported in a warning, and if every example is too long a
    DemError is raised rather than silently losing the whole source.
    """
    if too_long not in ("drop", "truncate"):
        raise DemError(f"too_long must be 'drop' or 'truncate', got {too_long!r}")
    if not examples:
        raise DemError(f"{name}: no examples to encode")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DemError("the tokenizer has no eos token; set tokenizer.eos_token")
    prompt_ids = encode_prompts(tokenizer, [ex.prompt for ex in examples])
    response_ids = tokenizer([ex.response for ex in examples], add_special_tokens=False)[
        "input_ids"
    ]
    encoded, n_long, longest = [], 0, 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        ids = p + r + [eos]
        labels = [IGNORE_INDEX] * len(p) + r + [eos]
        if len(ids) > max_length:
            n_long += 1
            longest = max(longest, len(ids))
            if too_long == "drop" or len(p) >= max_length:
                continue  # a cut-off prompt leaves nothing to learn: drop even when truncating
            ids, labels = ids[:max_length], labels[:max_length]
        encoded.append({"input_ids": ids, "labels": labels})
    if n_long:
        if not encoded:
            raise DemError(
                f"{name}: all {len(examples)} examples are longer than max_length={max_length} "
                f"tokens (longest {longest}); raise max_length"
            )
        action = (
            "dropped"
            if too_long == "drop"
            else "truncated (or dropped if the prompt alone is too long)"
        )
        warnings.warn(
            f"{name}: {n_long} of {len(examples)} examples are longer than max_length="
            f"{max_length} tokens (longest {longest}) and were {action}",
            stacklevel=2,
        )
    return encoded


def length_stats(encoded: Sequence[dict[str, Sequence[int]]]) -> dict[str, float]:
    """Counts and length statistics (tokens) of encoded examples: for tables and figures."""
    if not encoded:
        return {"examples": 0}
    lengths = sorted(len(e["input_ids"]) for e in encoded)
    responses = [sum(1 for x in e["labels"] if x != IGNORE_INDEX) for e in encoded]
    n = len(lengths)
    return {
        "examples": n,
        "tokens": sum(lengths),
        "response_tokens": sum(responses),
        "mean_length": sum(lengths) / n,
        "min_length": lengths[0],
        "median_length": lengths[n // 2],
        "p95_length": lengths[min(n - 1, int(0.95 * n))],
        "max_length": lengths[-1],
        "mean_response_length": sum(responses) / n,
    }


def make_batches(
    encoded: Sequence[dict[str, Sequence[int]]],
    batch_size: int,
    pad_id: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    pool_batches: int = 64,
) -> list[dict[str, torch.Tensor]]:
    """Length-bucketed, right-padded batches (keys input_ids, attention_mask, labels).

    Examples are shuffled, cut into pools of ``pool_batches`` batches, sorted by length within
    each pool and chunked: batches hold similar lengths (little padding) yet their contents
    still change with the seed. Batch order is shuffled too. Deterministic for a seed.
    """
    if batch_size < 1:
        raise DemError(f"batch_size must be positive, got {batch_size}")
    order = list(range(len(encoded)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
        pool = batch_size * pool_batches
        chunks = [order[i : i + pool] for i in range(0, len(order), pool)]
    else:
        chunks = [order]  # evaluation: one global sort, the least padding
    groups: list[list[int]] = []
    for chunk in chunks:
        chunk = sorted(chunk, key=lambda i: len(encoded[i]["input_ids"]))
        groups += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(groups)
    return [pad_batch([encoded[i] for i in group], pad_id) for group in groups]


def pad_batch(rows: Sequence[dict[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples, in the given order, into one batch.

    Keys input_ids (``pad_id`` on padding), attention_mask (0 on padding) and labels
    (``IGNORE_INDEX`` on padding, so the loss never falls on it). The one padding routine of
    training, validation and evaluation.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padding_fraction(batches: Sequence[dict[str, Any]]) -> float:
    """Share of batch positions that are padding (attention_mask == 0)."""
    total = sum(b["attention_mask"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return 1.0 - real / total if total else 0.0


def length_table(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[Any],
    split: str = "train",
    max_length: int = 1024,
):
    """Length statistics per source as a DataFrame (one row per source): for tables/figures."""
    import pandas as pd

    rows = []
    for source in sources:
        encoded = encode_examples(tokenizer, source.examples(split), max_length, name=source.name)
        rows.append({"source": source.name, "split": split, **length_stats(encoded)})
    return pd.DataFrame(rows)
