"""Tiny random Llama models in a temporary folder for the merge tests (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open


def save_llama(
    folder: Path,
    *,
    seed: int = 0,
    base: Path | None = None,
    noise: float = 0.02,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    hidden: int = 32,
    layers: int = 2,
) -> Path:
    """Save a tiny Llama: random weights, or ``base``'s weights plus seeded Gaussian noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if base is not None:
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():  # tied weights appear once here, so stay tied
                p.add_(noise * torch.randn_like(p))
    else:
        config = LlamaConfig(
            vocab_size=96,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if base is None:  # a stand-in tokenizer: the merge must copy these files unchanged
        (folder / "tokenizer.json").write_text(json.dumps({"tiny": "tokenizer", "seed": seed}))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((base / name).read_bytes())
    return folder


def load_weights(folder: Path, prefix: str = "model") -> dict[str, np.ndarray]:
    """Every tensor of a model or vector folder as float64 numpy (the reference side)."""
    out = {}
    for file in sorted(Path(folder).glob(f"{prefix}*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = t.double().numpy() if t.is_floating_point() else t.numpy()
    return out


def weight_dtypes(folder: Path) -> dict[str, torch.dtype]:
    out = {}
    for file in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).dtype
    return out


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path_factory, monkeypatch):
    """Each test hashes from scratch, and nothing is written to the user's ~/.cache.

    Autouse in every test module that imports it (the merge tests).
    """
    monkeypatch.setenv("DEM_CACHE_DIR", str(tmp_path_factory.mktemp("dem-cache")))
