"""Pretraining the tiny base: a fresh tiny Llama trained on generated generic text.

The text (:mod:`dem.sources.pretraining`) shares the tiny tokenizer's characters with every
source but none of their formats, so the base knows the alphabet and how to copy from its
context, yet is weak on every task -- the starting point DEM's fine-tunes move away from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dem import models as dem_models
from dem.sources import knowledge, pretraining
from dem.sources.data import build_tiny_tokenizer, pad_batch
from dem.training.loop import accelerator_for, train_loop, transformers_bars
from dem.training.runs import (
    complete,
    discard_if_untrained,
    prepare_synced,
    start_run,
    training_record,
)
from dem.training.schedule import build_schedule
from dem.training.settings import PretrainSettings


def pack(tokenizer: Any, docs: list[str], seq_len: int) -> list[dict]:
    """Concatenate ``<bos> doc <eos>`` and cut into blocks of ``seq_len`` (no padding at all)."""
    ids: list[int] = []
    for doc_ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *doc_ids, tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return [
        {
            "input_ids": ids[i * seq_len : (i + 1) * seq_len],
            "labels": ids[i * seq_len : (i + 1) * seq_len],
        }
        for i in range(n)
    ]


def pretrain(
    out_dir: str | Path,
    *,
    settings: PretrainSettings | None = None,
    overwrite: bool = False,
    replace: bool = False,
    allow_mix: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> Path:
    """Build the tiny base: a fresh tiny Llama pretrained on generic text; returns its folder.

    ``settings`` (default :class:`PretrainSettings`), updated by ``overrides`` (its field
    names: ``steps``, ``hidden_size``, ...). Cached by its parameters: if ``out_dir`` already
    holds a finished pretraining with the same parameters, nothing is recomputed; an unfinished
    one resumes (on another torch, device, dtype or thread count only with ``allow_mix``). The
    folder is an ordinary HF model folder plus ``train_log.csv``, ``cost.json`` and
    ``dem_train.json``.
    """
    s = (settings or PretrainSettings()).updated(**overrides)
    out = Path(out_dir)
    corpus = {"generic": pretraining, "knowledge": knowledge}[s.corpus]
    params = s.parameters(corpus.CORPUS_VERSION)
    accelerator = accelerator_for(s.device)
    work, cached = prepare_synced(
        accelerator, out, params, overwrite, replace, allow_mix, dtype=s.dtype
    )
    if cached is not None:
        return out
    record = training_record("pretrain", params, accelerator, s.dtype)
    start_run(accelerator, work, record)

    tokenizer = build_tiny_tokenizer()
    with discard_if_untrained(accelerator, work):
        model = dem_models.build_tiny_model(
            tokenizer,
            hidden_size=s.hidden_size,
            num_layers=s.num_layers,
            num_heads=s.num_heads,
            intermediate_size=s.intermediate_size,
            max_position_embeddings=s.max_position_embeddings,
            seed=s.seed,
        )
        data = _text_batches(tokenizer, corpus, s, accelerator.num_processes)
    result = train_loop(model, tokenizer, work, settings=s, accelerator=accelerator,
                        progress=progress, callback=callback, **data)  # fmt: skip
    with transformers_bars(progress):
        complete(result, tokenizer, work, out, record)
    accelerator.wait_for_everyone()
    return out


def _text_batches(tokenizer: Any, corpus: Any, s: PretrainSettings, world: int) -> dict:
    """Packed training blocks with their order, and the validation batches, of ``corpus``."""
    n_blocks = s.steps * s.batch_size * world
    # ~10% more text than needed, so the packed blocks cover the run without repeats.
    train_text = corpus.pretraining_text(int(n_blocks * s.seq_len * 1.1), s.seed)
    train_blocks = pack(tokenizer, train_text, s.seq_len)
    val_text = corpus.pretraining_text(64 * s.seq_len, s.seed + 1_000_003)
    val_blocks = pack(tokenizer, val_text, s.seq_len)
    lengths = {"text": [s.seq_len] * len(train_blocks)}
    schedule = build_schedule(
        lengths, {"text": 1.0}, n_batches=s.steps * world, batch_size=s.batch_size, seed=s.seed
    )
    val_batches = {
        "text": [
            pad_batch(val_blocks[i : i + s.batch_size], tokenizer.pad_token_id)
            for i in range(0, len(val_blocks), s.batch_size)
        ]
    }
    return {"schedule": schedule, "encoded": {"text": train_blocks}, "val_batches": val_batches}
