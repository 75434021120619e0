"""A tiny GGUF base the tests write themselves: the tiny Llama of _helpers_train in llama.cpp's
format (gpt2-style tokenizer, q/k rows permuted as llama.cpp's converter does), so the GGUF path
of every command runs in a second without downloading anything. Loaded by transformers, it
gives the folder's logits exactly."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.torch import load_file


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table (byte-level BPE vocabularies are written in it)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def permute(w, n_head):
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(base: Path, path: Path) -> Path:
    """Write the model folder ``base`` (a tiny Llama, tied embeddings) as a GGUF file."""
    cfg = json.loads((base / "config.json").read_text())
    tok = json.loads((base / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    L, H, KV = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(L)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_rope_dimension_count(cfg["hidden_size"] // H)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(cfg["vocab_size"])
    _write_tokenizer(writer, tok, cfg)
    _write_tensors(writer, load_file(base / "model.safetensors"), H, KV)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_tokenizer(writer, tok: dict, cfg: dict) -> None:
    b2u = _bytes_to_unicode()
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])

    def enc(t):
        if t.startswith("<") and t.endswith(">") and len(t) > 1:
            return t
        return "".join(b2u[b] for b in t.encode())

    # GPT2Tokenizer adds <|endoftext|> unless the vocabulary has it: the unknown token's place
    tokens = ["<|endoftext|>" if t == "<unk>" else enc(t) for t, _ in vocab]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<") and len(t) > 1 else 1 for t, _ in vocab])
    writer.add_token_merges(
        [" ".join(enc(p) for p in m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
        or []
    )
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_unk_token_id(tok["model"]["vocab"]["<unk>"])


def _write_tensors(writer, w: dict, H: int, KV: int) -> None:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in w.items():
        a = t.float().numpy()
        if name in names:
            out = names[name]
        else:
            i = name.split(".")[2]
            rest = ".".join(name.split(".")[3:-1])
            out = f"blk.{i}.{parts[rest]}.weight"
            if rest == "self_attn.q_proj":
                a = permute(a, H)
            if rest == "self_attn.k_proj":
                a = permute(a, KV)
        writer.add_tensor(out, np.ascontiguousarray(a))
