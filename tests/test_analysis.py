"""Vector statistics against direct float64 computations on flattened vectors."""

import pandas as pd
import torch

from dem.chapters.analysis import cosine_similarity, layer_norms, sign_agreement
from dem.search.gradient import block_rank, tensor_blocks


def _vectors():
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.embed_tokens.weight"]
    vectors = {}
    for source in ("a", "b", "c"):
        vectors[source] = {n: torch.randn(7, 5, generator=g) for n in names}
        vectors[source]["model.layers.0.mlp.weight"][0] = 0.0  # entries that did not move
        vectors[source]["step"] = torch.tensor([3])  # integer tensors are ignored
    return vectors


def _flat(vector):
    return torch.cat([vector[n].reshape(-1).double() for n in sorted(vector) if n != "step"])


def test_cosine_and_sign_agreement_match_direct_computation():
    vectors = _vectors()
    cosine, signs = cosine_similarity(vectors), sign_agreement(vectors)
    for a in vectors:
        for b in vectors:
            x, y = _flat(vectors[a]), _flat(vectors[b])
            expected = float(x @ y / (x.norm() * y.norm()))
            assert abs(cosine.loc[a, b] - expected) < 1e-6
            both = (x != 0) & (y != 0)
            same = ((torch.sign(x) == torch.sign(y)) & both).sum().double() / both.sum().double()
            assert abs(signs.loc[a, b] - float(same)) < 1e-12
    assert (pd.Series(cosine.values.diagonal()) - 1).abs().max() < 1e-6


def test_layer_norms_group_by_block():
    vectors = _vectors()
    norms = layer_norms(vectors).set_index(["source", "layer"])["norm"]
    expected = vectors["b"]["model.layers.1.mlp.weight"].double().norm()
    assert abs(norms[("b", "layer1")] - float(expected)) < 1e-9
    # the blocks of chapter 04's per-layer weights, in the model's order
    assert list(layer_norms(vectors).query("source == 'b'").layer) == sorted(
        set(tensor_blocks([n for n in vectors["b"] if n != "step"]).values()), key=block_rank
    )
