"""Compute precision: float32, or bf16 autocast where it is faster at equal accuracy.

Weights and optimizer state stay float32 in every case; ``bfloat16`` runs the matmuls under
``torch.autocast`` (training and scoring alike, through :func:`autocast`). ``auto`` follows what ``benchmarks/bench_bf16.py`` measured on this project's
CPUs (avx512_bf16 and AMX, torch 2.13, one thread): for SmolLM2-135M a LoRA training step runs
1.26-1.40x and a scoring pass 1.96-2.21x faster in bf16, with fine-tuned accuracy inside the
seed-to-seed spread; for the shipped tiny bases (<= 2.6M parameters) the tutorial's training
loop runs 10-25% *slower*, its matmuls too small for the casts to pay. So ``auto`` is bf16 on
GPUs that support it (as before), bf16 on CPUs with native bf16 for bases of
:data:`LARGE_BASE_PARAMS` or more, and float32 otherwise.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch

from dem import DemError

# The shipped tiny bases have at most 2.6M parameters, SmolLM2 (the smallest real LM the project
# runs) 135M; the rule needs a line between them, not a precise one.
LARGE_BASE_PARAMS = 20_000_000

DTYPES = ("auto", "float32", "bfloat16")  # the dtype setting's choices
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_compute = {"dtype": torch.float32}  # this process's scoring precision (set by the chapters)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX; Linux's /proc/cpuinfo).

    Hand-read because torch has no public query for it; elsewhere (macOS, Windows) False, so
    ``auto`` stays float32 there.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    return "avx512_bf16" in flags or "amx_bf16" in flags


def is_large(n_params: int | None) -> bool:
    """A real LM rather than a shipped tiny base (None: not counted yet, e.g. a GGUF file)."""
    return n_params is None or n_params >= LARGE_BASE_PARAMS


def pick_dtype(
    device: torch.device | str, choice: str = "auto", *, large: bool = False
) -> torch.dtype:
    """The compute precision for ``device``: ``choice`` (float32, bfloat16) or the auto rule."""
    if choice not in DTYPES:
        raise DemError(f"dtype must be one of {', '.join(DTYPES)}, got {choice!r}")
    device = torch.device(device)
    if choice != "auto":
        if choice == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DemError("dtype bfloat16 was asked for but this GPU does not support it")
        return _TORCH[choice]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and large and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32  # MPS: bf16 needs macOS 14+, and fp32 always works


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def set_compute_dtype(dtype: torch.dtype) -> None:
    """The precision :func:`autocast` scores in, for this process (``dem.chapters`` sets it)."""
    _compute["dtype"] = dtype


def autocast(device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """bf16 autocast on ``device`` for ``dtype`` bfloat16 (default: this process's scoring
    precision, :func:`set_compute_dtype`), else nothing."""
    if (dtype or _compute["dtype"]) != torch.bfloat16:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def base_is_large(base_model: str | Path) -> bool:
    """Whether a run's base is a real LM, by :func:`is_large`: a shipped (``dem:NAME``) or local
    folder counted from its weights; a GGUF file, package path or hub id counts as one (it is
    converted or downloaded later); empty (a tiny base pretrained from scratch) does not."""
    from dem import models

    if not str(base_model):
        return False
    folder = Path(models.shipped_base(base_model))
    if folder.is_dir() and next(folder.glob("*.safetensors"), None) is not None:
        return is_large(models.count_folder_parameters(folder))
    return is_large(None)
