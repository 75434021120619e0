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


# --- float64 references for every merge method, written entry by entry -----------------------------
def model_uniforms(tensor_seed: int, numel: int, n: int) -> list[np.ndarray]:
    """The U[0,1) draws a random method makes for n models of one tensor, in row-major order
    (the generator is an input here, not under test): one seed per model from the tensor's."""
    g = torch.Generator().manual_seed(tensor_seed)
    seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
    return [torch.rand(numel, generator=torch.Generator().manual_seed(s)).double().numpy()
            for s in seeds]  # fmt: skip


def _by_magnitude(flat: np.ndarray) -> np.ndarray:
    """Indices from the largest |x| down; equal magnitudes in index order."""
    return np.argsort(-np.abs(flat), kind="stable")


def ref_band(v: np.ndarray, start: int, stop: int) -> np.ndarray:
    flat = v.ravel()
    keep = _by_magnitude(flat)[start:stop]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(v.shape)


def ref_top(v: np.ndarray, density: float) -> np.ndarray:
    n = v.size
    return ref_band(v, 0, n if density >= 1 else max(1, int(density * n)))


def ref_outliers(v: np.ndarray, density: float, gamma: float) -> np.ndarray:
    n = v.size
    if density >= 1:
        return v.copy()
    keep, top = int(density * n), int(gamma * n)
    start = min(top, n - keep)
    return ref_band(v, start, start + keep)


def ref_consensus(vs: list[np.ndarray], w: list[float], normalize: bool) -> np.ndarray:
    out = np.zeros(vs[0].size)
    flat = [v.ravel() for v in vs]
    for j in range(out.size):
        d = [w_i * f[j] for w_i, f in zip(w, flat, strict=True)]
        gamma = 1.0 if sum(d) >= 0 else -1.0
        agree = [i for i in range(len(d)) if np.sign(d[i]) == gamma]
        out[j] = sum(d[i] for i in agree)
        if normalize:
            divisor = sum(w[i] for i in agree)
            out[j] /= divisor if divisor != 0 else 1.0
    return out.reshape(vs[0].shape)


def ref_magprune(v: np.ndarray, u: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    rows = v.reshape(v.shape[0], -1) if v.ndim >= 2 else v.reshape(1, -1)
    u = u.reshape(rows.shape)
    out = np.zeros_like(rows)
    n = rows.shape[1]
    for r in range(rows.shape[0]):
        ranks = np.empty(n)
        ranks[np.argsort(np.abs(rows[r]), kind="stable")] = np.arange(n)
        p = density - epsilon + 2 * epsilon * ranks / max(n - 1, 1)
        out[r] = np.where(u[r] < p, rows[r] / p, 0)
    return out.reshape(v.shape)


def reference(method: str, b: np.ndarray, thetas: list[np.ndarray], w: list[float], p: dict,
              seed: int | None = None) -> np.ndarray:  # fmt: skip
    """θ of one tensor by ``method`` in float64; ``seed`` is the tensor's seed (random methods)."""
    vs = [t - b for t in thetas]
    lam = p.get("lam", 1.0)
    if method in ("dare_linear", "dare_ties", "della", "della_linear"):
        us = [u.reshape(b.shape) for u in model_uniforms(seed, b.size, len(vs))]
        if method.startswith("dare"):
            q = p["drop_prob"]
            vs = [v * (u >= q) / (1 - q) for v, u in zip(vs, us, strict=True)]
        else:
            vs = [
                ref_magprune(v, u, p["density"], p["epsilon"]) for v, u in zip(vs, us, strict=True)
            ]
    weighted = lambda xs: sum(w_i * x for w_i, x in zip(w, xs, strict=True))  # noqa: E731
    if method in ("dem", "task_arithmetic", "dare_linear", "della_linear"):
        return b + lam * weighted(vs)
    if method == "linear":
        return weighted(thetas)
    if method in ("ties", "dare_ties"):
        return b + lam * ref_consensus([ref_top(v, p["density"]) for v in vs], w, True)
    if method == "della":
        return b + lam * ref_consensus(vs, w, True)
    if method.startswith("breadcrumbs"):
        kept = [ref_outliers(v, p["density"], p["gamma"]) for v in vs]
        return b + lam * (ref_consensus(kept, w, False) if "ties" in method else weighted(kept))
    if method == "model_stock":
        flat = [v.ravel() for v in vs]
        n = len(flat)
        cos = [np.clip(flat[i] @ flat[j] / max(np.linalg.norm(flat[i]) * np.linalg.norm(flat[j]),
                                               1e-6), -1, 1)
               for i in range(n) for j in range(i + 1, n)]  # fmt: skip
        c = np.mean(cos)
        t = 0.0 if abs(1 + (n - 1) * c) < 1e-6 else n * c / (1 + (n - 1) * c)
        return b + t * weighted(vs)
    if method == "slerp":
        (t,), x1 = w, thetas[0]
        cos = np.clip(b.ravel() @ x1.ravel() / (np.linalg.norm(b) * np.linalg.norm(x1)), -1, 1)
        if abs(cos) > 0.9995:
            return (1 - t) * b + t * x1
        omega = np.arccos(cos)
        return (np.sin((1 - t) * omega) * b + np.sin(t * omega) * x1) / np.sin(omega)
    raise AssertionError(f"no reference for {method}")
