"""What distribution vectors look like: norms per layer, similarity and sign agreement.

Cosine similarity and sign agreement between two sources' vectors say how much their
fine-tunes moved the base in the same direction; near-orthogonal vectors interfere little when
added, which is why a weighted sum can keep every source's skill.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pandas as pd
import torch

Vector = Mapping[str, torch.Tensor]
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> str:
    """Group a tensor name by transformer block: ``layer 3``, or ``embeddings`` / ``other``."""
    match = _LAYER.search(name)
    if match:
        return f"layer {int(match.group(1)):02d}"
    return "embeddings" if "embed" in name or "lm_head" in name else "other"


def _floating(vector: Vector) -> dict[str, torch.Tensor]:
    return {n: t for n, t in vector.items() if t.is_floating_point()}


def layer_norms(vectors: Mapping[str, Vector]) -> pd.DataFrame:
    """L2 norm of each source's vector per layer group (tidy: source, layer, norm)."""
    rows = []
    for source, vector in vectors.items():
        squares: dict[str, float] = {}
        for name, tensor in _floating(vector).items():
            group = layer_of(name)
            squares[group] = squares.get(group, 0.0) + float(tensor.double().pow(2).sum())
        rows += [{"source": source, "layer": g, "norm": s**0.5} for g, s in squares.items()]
    return pd.DataFrame(rows).sort_values(["source", "layer"], ignore_index=True)


def _pairwise(vectors: Mapping[str, Vector]) -> dict[str, torch.Tensor]:
    """Source × source sums over all entries, accumulated tensor by tensor.

    Stacking the K vectors of one tensor as rows of X, X Xᵀ gives every pair's dot product, and
    the same product on signs gives sign agreements — no model-sized flat copy is ever built.
    """
    names = list(vectors)
    k = len(names)
    dot = torch.zeros(k, k, dtype=torch.float64)
    same_sign = torch.zeros(k, k, dtype=torch.float64)
    both_moved = torch.zeros(k, k, dtype=torch.float64)
    for tensor_name in sorted(_floating(vectors[names[0]])):
        x = torch.stack([vectors[s][tensor_name].reshape(-1).float() for s in names])
        dot += (x @ x.T).double()
        sign = torch.sign(x)
        moved = sign.abs()
        # For entries where both moved, sign_a * sign_b is +1 (agree) or -1 (disagree).
        agree = (sign @ sign.T).double()
        both = (moved @ moved.T).double()
        same_sign += (both + agree) / 2
        both_moved += both
    return {"names": names, "dot": dot, "same_sign": same_sign, "both_moved": both_moved}


def cosine_similarity(vectors: Mapping[str, Vector]) -> pd.DataFrame:
    """Cosine similarity of the whole (flattened) vectors, source × source."""
    sums = _pairwise(vectors)
    norms = sums["dot"].diagonal().sqrt()
    cosine = sums["dot"] / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    return pd.DataFrame(cosine.numpy(), index=sums["names"], columns=sums["names"])


def sign_agreement(vectors: Mapping[str, Vector]) -> pd.DataFrame:
    """Fraction of entries where two vectors have the same sign (among entries both moved)."""
    sums = _pairwise(vectors)
    share = sums["same_sign"] / sums["both_moved"].clamp_min(1)
    return pd.DataFrame(share.numpy(), index=sums["names"], columns=sums["names"])
