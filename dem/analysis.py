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


def _flat(vector: Vector) -> torch.Tensor:
    tensors = _floating(vector)
    return torch.cat([tensors[n].reshape(-1).double() for n in sorted(tensors)])


def cosine_similarity(vectors: Mapping[str, Vector]) -> pd.DataFrame:
    """Cosine similarity of the whole flattened vectors, source × source."""
    flat = {s: _flat(v) for s, v in vectors.items()}
    names = list(flat)
    data = [
        [float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0)) for b in names]
        for a in names
    ]
    return pd.DataFrame(data, index=names, columns=names)


def sign_agreement(vectors: Mapping[str, Vector]) -> pd.DataFrame:
    """Fraction of entries where two vectors have the same sign (among entries both moved)."""
    signs = {s: torch.sign(_flat(v)) for s, v in vectors.items()}
    names = list(signs)
    data = []
    for a in names:
        row = []
        for b in names:
            both = (signs[a] != 0) & (signs[b] != 0)
            same = (signs[a] == signs[b]) & both
            row.append(float(same.sum()) / max(int(both.sum()), 1))
        data.append(row)
    return pd.DataFrame(data, index=names, columns=names)
