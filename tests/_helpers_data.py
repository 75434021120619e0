"""Shared test utilities of the data/evaluation tests: a tiny random model and a bigram stub."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dem.sources.data import build_tiny_tokenizer

torch.set_num_threads(1)  # one thread is faster on these small shared machines


def tiny_model(tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A random LlamaForCausalLM small enough for unit tests (about 40k parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


class BigramStub(torch.nn.Module):
    """A "model" whose next-token logits depend only on the current token: outputs we control.

    ``follow`` maps a character (or special token) to the token that must come next; every
    other continuation gets a low score. It ignores the KV cache (returns none), which is fine
    for a bigram model because the greedy loop feeds the last token at each step.
    """

    def __init__(self, tokenizer, follow: dict[str, str]) -> None:
        super().__init__()
        vocab = len(tokenizer)
        table = torch.zeros(vocab, vocab)
        for prev, nxt in follow.items():
            table[tokenizer.convert_tokens_to_ids(prev), tokenizer.convert_tokens_to_ids(nxt)] = (
                20.0
            )
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(max_position_embeddings=256)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


def tokenizer():
    return build_tiny_tokenizer()
