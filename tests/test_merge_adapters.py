"""peft LoRA adapters as merge inputs: the same merge as their merged-and-unloaded models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_merge import load_weights, private_hash_cache, save_llama  # noqa: F401 (autouse)

from dem import DemError
from dem.cli import main
from dem.merging import merge as M

torch.set_num_threads(1)
peft = pytest.importorskip("peft")


def _adapter(base: Path, out: Path, seed: int, **config) -> tuple[Path, Path]:
    """A LoRA adapter of ``base`` with random A and B, and the model peft merges it into."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"],
                           init_lora_weights=False, **config)  # fmt: skip
    peft_model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # larger than peft's random init, so the update is well above rounding
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    peft_model.save_pretrained(out / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    return out / "adapter", out / "merged"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    base = save_llama(d / "base")
    a, am = _adapter(base, d / "plain", 1, r=4, lora_alpha=8)
    b, bm = _adapter(
        base, d / "rs", 2, r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2}
    )
    m1 = save_llama(d / "m1", base=base, seed=3)
    return {"base": base, "a": a, "a_merged": am, "b": b, "b_merged": bm, "m1": m1}


@pytest.mark.parametrize("method", ["dem", "ties", "model_stock"])
def test_adapter_merges_like_its_merged_model(zoo, tmp_path, method):
    assert (zoo["a"] / "adapter_model.safetensors").exists()
    with_adapters = [(zoo["a"], 0.6), (zoo["b"], 0.5), (zoo["m1"], 0.3)]
    with_models = [(zoo["a_merged"], 0.6), (zoo["b_merged"], 0.5), (zoo["m1"], 0.3)]
    kw = dict(method=method, progress=False, **({"density": 0.5} if method == "ties" else {}))
    got = load_weights(M.merge(zoo["base"], with_adapters, tmp_path / "a", **kw))
    want = load_weights(M.merge(zoo["base"], with_models, tmp_path / "m", **kw))
    base = load_weights(zoo["base"])
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(got[q] - base[q]).max() > 1e-2  # the adapters did change the adapted matrices
    record = json.loads((tmp_path / "a" / "dem_merge.json").read_text())
    assert [m["kind"] for m in record["models"]] == ["adapter", "adapter", "model"]
    assert record["models"][1]["adapter"]["use_rslora"] is True
    assert list(record["models"][0]["sha256"]) == ["adapter_model.safetensors"]


def _edited(adapter: Path, dst: Path, **fields) -> Path:
    shutil.copytree(adapter, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return dst


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"use_dora": True}, "use_dora = true is not supported"),
        ({"modules_to_save": ["lm_head"]}, 'modules_to_save = ["lm_head"] is not supported'),
        ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
        ({"lora_alpha": "big"}, 'lora_alpha = "big"; expected a positive number'),
    ],
)
def test_unsupported_adapters_are_refused_by_file_and_field(
    zoo, tmp_path, capsys, fields, expected
):
    bad = _edited(zoo["a"], tmp_path / "bad", **fields)
    out = tmp_path / "out"
    argv = ["merge", "--base", str(zoo["base"]), "--model", f"{bad}=1", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(bad / "adapter_config.json") in err and expected in err, err
    assert not out.exists()


def test_adapter_of_another_model_is_refused(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(zoo["a"], bad)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.lora_A.weight"))
    weights[key] = torch.zeros(4, 7)  # A for a 7-wide input: not the base's 32
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(DemError, match=r"adapter_model.safetensors: LoRA on .*q_proj.* not make"):
        M.merge(zoo["base"], [(bad, 1.0)], tmp_path / "out", progress=False)
    weights[key.replace("q_proj", "nope")] = weights.pop(key)
    save_file(weights, bad / "adapter_model.safetensors")
    with pytest.raises(DemError, match="has lora_A but not both A and B|no floating-point matrix"):
        M.merge(zoo["base"], [(bad, 1.0)], tmp_path / "out", progress=False)


def test_nan_in_an_adapter_is_traced_to_its_lora_matrix(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(zoo["a"], bad)
    weights = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.mlp.up_proj.lora_B.weight"))
    weights[key][3, 1] = float("nan")
    save_file(weights, bad / "adapter_model.safetensors")
    # the merge sees the NaN only in B·A's product: it names the adapter's B, not the base tensor
    for models in ([(bad, 0.5)], [(zoo["m1"], 0.5), (bad, 0.5)]):
        with pytest.raises(DemError) as err:
            M.merge(zoo["base"], models, tmp_path / "out", progress=False)
        file = bad / "adapter_model.safetensors"
        assert str(err.value) == f"{file}: tensor {key!r} contains NaN or Inf"
