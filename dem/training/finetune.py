"""Fine-tuning a base on one source or a mixture of sources (DMix).

Each training example's source is drawn by the mixture ratios (deterministic by the seed); the
loss falls on response tokens only. A run is cached and resumable by its parameters (see
:mod:`dem.training.runs`), its knobs are :class:`~dem.training.settings.FinetuneSettings`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from dem import DemError, precision
from dem import models as dem_models
from dem.bases import resolve_base
from dem.sources import get_source
from dem.sources.data import encode_examples, pad_batch
from dem.training.loop import accelerator_for, train_loop, transformers_bars
from dem.training.lora import ADAPTER_DIR, add_lora, merge_lora, require_peft
from dem.training.runs import (
    complete,
    discard_if_untrained,
    fingerprint,
    prepare_synced,
    start_run,
    training_record,
)
from dem.training.schedule import build_schedule, normalize_mixture
from dem.training.settings import FinetuneSettings

VALIDATION_BATCH = 64  # validation examples per forward pass (sorted by length: little padding)


def use_gradient_checkpointing(requested: bool | None, device: torch.device) -> bool:
    """Whether to recompute activations in the backward pass instead of storing them.

    ``None`` chooses for the device: on for GPUs with less than 40 GB, where a real model's
    activations at batch 16 x 512 tokens crowd the memory; off on larger GPUs (H100, H200),
    where the ~30% recomputation would only slow training, and on CPU.
    """
    if requested is not None:
        return requested
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_properties(device).total_memory < 40 * 2**30


def _checked_sources(
    ratios: Mapping[str, float], source_kwargs: dict, custom_sources: dict
) -> dict:
    """The mixture's sources, each read once: an unknown name (DemError listing the known
    sources) or a malformed line in a user's file fails before any model or folder exists."""
    sources = {name: get_source(custom_sources.get(name, name), **source_kwargs) for name in ratios}
    for src in sources.values():
        src.examples("train"), src.examples("validation")
    return sources


def finetune(
    base: str | Path,
    out_dir: str | Path,
    *,
    mixture: Mapping[str, float],
    settings: FinetuneSettings | None = None,
    source_kwargs: Mapping[str, Any] | None = None,
    custom_sources: Mapping[str, Mapping[str, Any]] | None = None,
    overwrite: bool = False,
    replace: bool = False,
    allow_mix: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict], None] | None = None,
    **overrides: Any,
) -> dict:
    """Fine-tune ``base`` on a mixture of sources (``{"arithmetic": 1.0}`` = one source).

    ``settings`` (default :class:`FinetuneSettings`) are updated by ``overrides``, its field
    names (``steps=200, lr=2e-5``). Validation loss every ``eval_every`` steps; a checkpoint
    every ``save_every`` steps, to resume from. ``source_kwargs`` go to every
    :func:`dem.sources.get_source`; ``custom_sources`` maps a mixture name to a ``get_source``
    dict spec (your own data). ``overwrite`` discards whatever is in ``out_dir``; ``replace``
    redoes a dem run there only if its parameters differ; ``allow_mix`` resumes a checkpoint
    written with another torch, device, dtype or thread count. ``callback(step, log_row)``:
    after every optimizer step. ``lora_r > 0``: LoRA adapters (:mod:`dem.training.lora`) in an
    ordinary full model folder, the adapter in ``adapter/``. Returns ``out_dir/cost.json``.
    """
    s = (settings or FinetuneSettings()).updated(**overrides)
    ratios = normalize_mixture(mixture)
    source_kwargs = dict(source_kwargs or {})
    custom_sources = {k: dict(v) for k, v in (custom_sources or {}).items()}
    sources = _checked_sources(ratios, source_kwargs, custom_sources)
    accelerator, out = accelerator_for(s.device), Path(out_dir)
    with accelerator.main_process_first():  # a GGUF base is converted once, by one process
        folder = resolve_base(base)
    if (s := _for_base(s, folder, accelerator.device)).lora():
        require_peft()
    params = _parameters(base, folder, mixture, source_kwargs, custom_sources, s, accelerator)
    work, cached = prepare_synced(
        accelerator, out, params, overwrite, replace, allow_mix, dtype=s.dtype
    )
    if cached is not None:
        return cached
    record = training_record("finetune", params, accelerator, s.dtype)
    start_run(accelerator, work, record)
    with discard_if_untrained(accelerator, work):
        with transformers_bars(progress):
            model, tokenizer = dem_models.load_model(folder)
        model = _prepare_model(model, base, folder, s, accelerator)
        encoded, val_batches, schedule = _data(tokenizer, sources, ratios, s, accelerator)
    result = train_loop(model, tokenizer, work, settings=s, accelerator=accelerator,
                        progress=progress, callback=callback, schedule=schedule,
                        encoded=encoded, val_batches=val_batches)  # fmt: skip
    result["mixture"] = ratios
    if s.lora():
        _keep_adapter_and_merge(result, work)
    with transformers_bars(progress):
        result = complete(result, tokenizer, work, out, record)
    accelerator.wait_for_everyone()
    return result


def _for_base(s: FinetuneSettings, folder: Path, device: torch.device) -> FinetuneSettings:
    """The settings left to the base (lora_r, lr, dtype auto) chosen by its size."""
    large = precision.is_large(dem_models.count_folder_parameters(folder))
    dtype = precision.dtype_name(precision.pick_dtype(device, s.dtype, large=large))
    return s.for_base(large).updated(dtype=dtype)


def _parameters(base, folder, mixture, source_kwargs, custom_sources, s, accelerator) -> dict:
    """What the run records and compares on resume: its inputs and settings."""
    params = {
        "base": str(base),
        "base_sha256": fingerprint(folder),
        "mixture": dict(mixture),
        "source_kwargs": source_kwargs,
        "custom_sources": custom_sources,
        **s.parameters(),
        "processes": accelerator.num_processes,
    }
    # JSON round trip: what is compared on resume must be exactly what the record holds.
    return json.loads(json.dumps(params))


def _keep_adapter_and_merge(result: dict, work: Path) -> None:
    """Save the peft adapter beside the model, then merge it into the weights."""
    if result["_main"]:
        # The adapter as well as the merged model: `dem merge --model OUT/adapter` then forms
        # v = s·B·A block by block, and peft users can load it as it is.
        result["_model"].save_pretrained(work / ADAPTER_DIR)
    result["_model"] = merge_lora(result["_model"])


def _prepare_model(model: Any, base, folder, s: FinetuneSettings, accelerator: Any) -> Any:
    """What would fail at save, activation recomputation, the length check, LoRA adapters."""
    quantized = getattr(model.config, "quantization_config", None)
    if quantized is not None:  # transformers refuses to save it: found before training, not after
        raise DemError(
            f"base {base} is quantized ({getattr(quantized, 'quant_method', quantized)}) and a "
            "fine-tune of it cannot be saved; start from an unquantized copy of it"
        )
    checkpointing = use_gradient_checkpointing(s.gradient_checkpointing, accelerator.device)
    if checkpointing:
        # transformers 5 renamed it; the old name still works but warns.
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    if s.max_length > getattr(model.config, "max_position_embeddings", s.max_length):
        raise DemError(
            f"max_length={s.max_length} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}"
        )
    if s.lora():
        model = add_lora(model, folder, s.lora(), seed=s.seed, checkpointing=checkpointing)
    return model


def _data(tokenizer, sources, ratios, s: FinetuneSettings, accelerator: Any) -> tuple:
    """The encoded training examples, the validation batches and the order of the batches."""
    encoded = {
        name: encode_examples(tokenizer, src.examples("train"), s.max_length, name=f"{name} train")
        for name, src in sources.items()
    }
    val_batches = {
        name: _validation_batches(tokenizer, src.examples("validation"), s.max_length, name)
        for name, src in sources.items()
    }
    lengths = {name: [len(e["input_ids"]) for e in rows] for name, rows in encoded.items()}
    schedule = build_schedule(
        lengths,
        ratios,
        n_batches=s.steps * s.grad_accum * accelerator.num_processes,
        batch_size=s.batch_size,
        seed=s.seed,
    )
    return encoded, val_batches, schedule


def _validation_batches(
    tokenizer: Any, examples: list, max_length: int, name: str
) -> list[dict[str, torch.Tensor]]:
    """A source's validation examples, encoded (over-long ones truncated) and padded."""
    val = encode_examples(
        tokenizer, examples, max_length, too_long="truncate", name=f"{name} validation"
    )
    val = sorted(val, key=lambda e: len(e["input_ids"]))  # least padding
    return [
        pad_batch(val[i : i + VALIDATION_BATCH], tokenizer.pad_token_id)
        for i in range(0, len(val), VALIDATION_BATCH)
    ]
