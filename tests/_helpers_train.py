"""Shared helpers of the training tests: a tiny base model folder built in a temp dir."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

# Smaller than the tiny default (hidden 128, 4 layers) so a training step takes milliseconds.
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 64}
# Few short arithmetic examples: fast to encode, and learnable enough to lower the loss.
SOURCE_KWARGS = {"seed": 0, "n_train": 64, "n_validation": 32, "n_test": 16}
FAST = {
    "steps": 12,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup_steps": 2,
    "eval_every": 4,
    "max_length": 32,
    "source_kwargs": SOURCE_KWARGS,
    "progress": False,
}


class Interrupt(Exception):
    """Stands in for a crash or Ctrl-C in the middle of a run."""


def make_base(folder: Path) -> Path:
    """Save a freshly initialised tiny Llama with the tiny tokenizer as a model folder."""
    from dem.models import build_tiny_model, save_model
    from dem.sources.data import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    return save_model(build_tiny_model(tokenizer, **TINY), tokenizer, folder)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
