"""What distribution vectors look like: norms per layer, similarity and sign agreement.

Cosine similarity and sign agreement between two sources' vectors say how much their
fine-tunes moved the base in the same direction; near-orthogonal vectors interfere little when
added, which is why a weighted sum can keep every source's skill.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import torch

from dem.search.gradient import block_rank, tensor_blocks

Vector = Mapping[str, torch.Tensor]


def _floating(vector: Vector) -> dict[str, torch.Tensor]:
    return {n: t for n, t in vector.items() if t.is_floating_point()}


def layer_norms(vectors: Mapping[str, Vector]) -> pd.DataFrame:
    """L2 norm of each source's vector per layer group (tidy: source, layer, norm)."""
    # The blocks of the per-layer weight search (dem.search.gradient.tensor_blocks), so the norms
    # and the per-layer weights of chapter 04 speak of the same blocks.
    rows = []
    for source, vector in vectors.items():
        floating = _floating(vector)
        squares: dict[str, float] = {}
        for name, block in tensor_blocks(floating).items():
            squares[block] = squares.get(block, 0.0) + float(floating[name].double().pow(2).sum())
        ordered = sorted(squares, key=block_rank)
        rows += [{"source": source, "layer": b, "norm": squares[b] ** 0.5} for b in ordered]
    return pd.DataFrame(rows)


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
