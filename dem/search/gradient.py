"""The derivative of the validation loss with respect to DEM's merge weights, and the descent.

θ(w) = θ0 + Σ_i w_i·v_i is linear in w, so ∂L/∂w_i = Σ_tensors ⟨∇_θ L(θ(w)), v_i⟩: one forward and
one backward pass give the derivative for every weight at once, per source or per source and
block of layers. :func:`dem.search.weights.search_weights` uses it as its ``gradient`` strategy.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence

import torch

from dem import DemError


def tensor_blocks(names) -> dict[str, str]:
    """The block of layers each tensor belongs to, for per-layer weights: ``layer<i>`` for the
    tensors of transformer layer i, ``embed`` for the input embeddings, ``head`` for the rest
    (final norm, output layer; a tied output layer is the embedding)."""
    blocks = {}
    for n in names:
        layer = re.search(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.", n)
        if layer:
            blocks[n] = f"layer{int(layer.group(1))}"
        elif re.search(r"embed|wte|wpe", n):
            blocks[n] = "embed"
        else:
            blocks[n] = "head"
    return blocks


def is_per_block(w) -> bool:
    """Whether weights name one weight per source and block (``"facts@layer3"``)."""
    return isinstance(w, Mapping) and any("@" in k for k in w)


def block_rank(block: str) -> tuple[int, int]:
    if block == "embed":
        return (0, 0)
    if block.startswith("layer"):
        return (1, int(block[5:]))
    return (2, 0)


def fit_batches(
    tokenizer, sources, examples: Mapping[str, Sequence], *, batch_size: int = 16, max_length: int
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per source, the examples as padded batches (similar lengths together), for
    :meth:`InMemoryMerge.loss_and_gradient`; encoded once, reused at every step."""
    from dem.sources.data import encode_examples, pad_batch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    for source in sources:
        name = getattr(source, "name", source)
        encoded = encode_examples(tokenizer, examples[name], max_length, too_long="truncate")
        encoded.sort(key=lambda e: len(e["input_ids"]))
        out[name] = [pad_batch(encoded[i : i + batch_size], pad)
                     for i in range(0, len(encoded), batch_size)]  # fmt: skip
    return out


def loss_and_gradient(
    merger, w: Mapping[str, float], batches: Mapping[str, Sequence[Mapping[str, torch.Tensor]]]
) -> tuple[float, dict[str, float]]:
    """The validation loss J at θ(w) and its derivative ∂J/∂w for every weight in ``w``.

    J is the mean over sources of each source's response loss per token (what
    :func:`dem.search.weights.validation_scorer` reports as ``loss``), computed on ``batches`` (per source,
    :func:`dem.sources.data.pad_batch` batches; see :func:`fit_batches`). θ(w) is linear in w, so
    ∂J/∂w_i = Σ_tensors ⟨∇_θ J, v_i⟩, summed over the tensors of w_i's block when ``w`` has
    one weight per source and block — one backward pass serves every weight. The model
    is left at θ(w).
    """
    from dem.evaluation.evaluate import _eval_mode, response_nll
    from dem.sources.data import IGNORE_INDEX

    merger.apply(w)
    device = next(merger.model.parameters()).device
    for p in merger.params.values():
        p.requires_grad_(True)
        p.grad = None
    total = 0.0
    with _eval_mode(merger.model), torch.enable_grad():  # eval: no dropout in the objective
        for source_batches in batches.values():
            tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in source_batches)
            for batch in source_batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                nll, _ = response_nll(merger.model, batch, reduction="sum")
                loss = nll / (max(tokens, 1) * len(batches))
                loss.backward()
                total += float(loss.detach())
    per_block = is_per_block(w)
    grads: dict[str, float] = dict.fromkeys(w, 0.0)
    with torch.no_grad():
        for n, p in merger.params.items():
            g = p.grad.to(merger.dtypes[n])
            for s in merger.sources:
                key = f"{s}@{merger.block_of[n]}" if per_block else s
                grads[key] += float(torch.sum(g * merger.vectors[s][n], dtype=torch.float64))
            p.grad = None
    return total, grads


def descend(evaluate, gradient, names, start, *, steps, lr, low, high, select_every) -> list[dict]:
    """Projected Adam on the weights (β = 0.9, 0.999): each step's loss and weights, in order.

    Hand-written rather than torch.optim.Adam: the weights are a handful of Python floats whose
    derivative comes from :meth:`InMemoryMerge.loss_and_gradient`, not from autograd, and the
    projection onto [low, high] follows each step.
    """
    w = [min(max(start, low), high)] * len(names)
    m, v = [0.0] * len(w), [0.0] * len(w)
    b1, b2, eps = 0.9, 0.999, 1e-8
    path = []
    evaluate(w)
    for t in range(1, steps + 1):
        started = time.perf_counter()
        loss, grads = gradient(dict(zip(names, w, strict=True)), t - 1)
        path.append({"step": t - 1, "loss": loss, "step_s": time.perf_counter() - started,
                     **{f"w_{n}": x for n, x in zip(names, w, strict=True)}})  # fmt: skip
        g = [grads[n] for n in names]
        if not all(math.isfinite(x) for x in g):
            raise DemError(f"gradient search: non-finite derivative at step {t - 1} (loss {loss})")
        for i, g_i in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * g_i
            v[i] = b2 * v[i] + (1 - b2) * g_i * g_i
            step = lr * (m[i] / (1 - b1**t)) / (math.sqrt(v[i] / (1 - b2**t)) + eps)
            w[i] = min(max(w[i] - step, low), high)
        if t % select_every == 0 or t == steps:
            evaluate(w)
    return path
