"""LoRA fine-tuning (peft): merged adapters, low-rank deltas, exact resume, errors, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from _helpers_train import FAST, SOURCE_KWARGS, Interrupt, same_weights, weights

from dem import DemError
from dem.training.finetune import finetune

# peft is a dev dependency (pyproject.toml): these tests run, never skip, in CI.
torch.set_num_threads(1)

# Dropout on, so the exact-resume and determinism tests also cover the dropout RNG stream.
LORA = {**FAST, "lr": 1e-2, "lora_r": 4, "lora_dropout": 0.1}
MIX = {"arithmetic": 1.0}


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted LoRA run that several tests compare against."""
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, finetune(base, out, mixture=MIX, **LORA)


def test_output_is_an_ordinary_model_with_only_target_weights_changed(base, reference):
    out, cost = reference
    before, after = weights(base), weights(out)
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert not (out / "checkpoint").exists()
    # all-linear: every projection of every layer, never the embedding (tied output head)
    # or the norms.
    for name, tensor in before.items():
        targeted = name.endswith("_proj.weight")
        assert torch.equal(tensor, after[name]) != targeted, name
    record = json.loads((out / "dem_train.json").read_text())
    assert record["parameters"]["lora_r"] == 4 and record["parameters"]["lora_alpha"] == 8.0
    assert record["parameters"]["lora_target"] == "all-linear" and "peft" in record["versions"]
    assert 0 < cost["trainable_params"] < cost["params"] / 5
    assert cost["flops"] == 6 * cost["params"] * cost["train_tokens"]


def test_the_saved_adapter_merges_to_the_saved_model(base, reference, tmp_path):
    """The run's peft adapter is a merge input: v = s·B·A from it equals the merged model's."""
    from dem.merging.merge import merge

    out, _ = reference
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter.iterdir()
    }
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == LORA["lora_r"] and config["lora_alpha"] == 8.0
    # Weight 1 on the adapter alone rebuilds the fine-tune; 0.5 checks that the vector is s·B·A
    # and not something that only happens to equal the fine-tune at weight 1.
    for w in (1.0, 0.5):
        from_adapter = merge(base, [(adapter, w)], tmp_path / f"a{w}", progress=False)
        from_model = merge(base, [(out, w)], tmp_path / f"m{w}", progress=False)
        a, b = weights(from_adapter), weights(from_model)
        assert a.keys() == b.keys()
        worst = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert worst <= 1e-6, (w, worst)
    assert not torch.equal(weights(tmp_path / "a0.5")["model.layers.0.self_attn.q_proj.weight"],
                           weights(base)["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip


def test_lora_lowers_the_validation_loss(base, reference):
    from dem.evaluation.evaluate import response_loss
    from dem.models import load_model
    from dem.sources import get_source

    validation = get_source("arithmetic", **SOURCE_KWARGS).examples("validation")
    before = response_loss(*load_model(base), validation)
    after = response_loss(*load_model(reference[0]), validation)
    # nats per token. Measured 4.64 -> 4.42 (at lr 1e-2 to 5e-2 alike): with the embeddings of
    # a random-init base frozen, 12 steps of LoRA learn less than full fine-tuning (> 0.5).
    assert after < before - 0.1, (before, after)


def test_the_distribution_vector_is_low_rank(base, reference, tmp_path):
    """Merged rank-r adapters: W_ft - W_base has rank <= r in every targeted matrix."""
    name = "model.layers.0.self_attn.q_proj.weight"
    w_base = weights(base)
    delta = weights(reference[0])[name] - w_base[name]
    assert 1 <= torch.linalg.matrix_rank(delta, rtol=1e-4) <= LORA["lora_r"]
    # The check can fail: two steps of full fine-tuning already give a full-rank delta.
    full = tmp_path / "full"
    finetune(base, full, mixture=MIX, **{**FAST, "steps": 2, "eval_every": 1})
    delta = weights(full)[name] - w_base[name]
    assert torch.linalg.matrix_rank(delta, rtol=1e-4) > LORA["lora_r"]


def test_interrupted_lora_run_resumes_to_the_same_weights(base, reference, tmp_path):
    out = tmp_path / "run"

    def crash(step: int, row: dict) -> None:
        if step == 6:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(base, out, mixture=MIX, callback=crash, **LORA)
    checkpoint = tmp_path / "run.partial" / "checkpoint"
    assert any("lora_A" in k for k in weights(checkpoint))  # the wrapped model's state
    finetune(base, out, mixture=MIX, **LORA)
    assert same_weights(reference[0], out)


def test_same_seed_same_weights_other_seed_not(base, reference, tmp_path):
    finetune(base, tmp_path / "again", mixture=MIX, **LORA)
    assert same_weights(reference[0], tmp_path / "again")
    finetune(base, tmp_path / "other", mixture=MIX, **{**LORA, "seed": 1})
    assert not same_weights(reference[0], tmp_path / "other")


def test_gradient_checkpointing_gives_the_same_weights(base, reference, tmp_path):
    out = tmp_path / "gc"
    finetune(base, out, mixture=MIX, gradient_checkpointing=True, **LORA)
    assert same_weights(reference[0], out)


def test_other_lora_settings_are_another_run(base, reference):
    out, _ = reference
    with pytest.raises(DemError, match=r"parameters differ: lora_alpha, lora_r\)"):
        finetune(base, out, mixture=MIX, **{**LORA, "lora_r": 8})
    full = {k: v for k, v in LORA.items() if not k.startswith("lora_")}
    with pytest.raises(DemError, match="parameters differ: lora_alpha, lora_dropout, lora_r"):
        finetune(base, out, mixture=MIX, **full)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lora_r": -1}, r"lora_r must be an integer >= 0 \(0 = full fine-tuning\), got -1"),
        ({"lora_r": 2.5}, "lora_r must be an integer >= 0"),
        ({"lora_r": 4, "lora_alpha": 0}, "lora_alpha must be a positive number, got 0"),
        ({"lora_r": 4, "lora_dropout": 1.0}, r"lora_dropout must be a number in \[0, 1\)"),
        ({"lora_r": 4, "lora_target": " , "}, "lora_target must name modules"),
        ({"lora_dropout": 0.1}, "need lora_r > 0"),
        (
            {"lora_r": 4, "lora_target": "qkv"},
            r"lora_target='qkv' does not fit model .*base.*linear layers are: down_proj, "
            "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        ),
    ],
)
def test_bad_lora_options(base, tmp_path, kwargs, message):
    with pytest.raises(DemError, match=message) as err:
        finetune(base, tmp_path / "x", mixture=MIX, **{**FAST, **kwargs})
    assert "\n" not in str(err.value)
    # Checked before any training: nothing is left that a corrected rerun would trip over.
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_missing_peft_names_the_install_command(base, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(DemError, match=r"needs the peft package: pip install 'dem\[lora\]'"):
        finetune(base, tmp_path / "x", mixture=MIX, **{**FAST, "lora_r": 4})


def test_cli_lora_on_chosen_modules(base, tmp_path, capsys):
    from dem.cli import main

    out = tmp_path / "ft"
    argv = ["finetune", "--base", str(base), "--source", "arithmetic", "--out", str(out)]
    argv += ["--steps", "3", "--batch-size", "4", "--n-train", "16", "--n-validation", "8"]
    argv += ["--max-length", "32", "--eval-every", "2", "--no-progress", "--threads", "1"]
    assert (
        main([*argv, "--lora-r", "4", "--lora-alpha", "16", "--lora-target", "q_proj,v_proj"]) == 0
    )
    cost = json.loads(capsys.readouterr().out)
    assert 0 < cost["trainable_params"] < cost["params"]
    params = json.loads((out / "dem_train.json").read_text())["parameters"]
    assert (params["lora_r"], params["lora_alpha"], params["lora_target"]) == (
        4,
        16.0,
        "q_proj,v_proj",
    )
    before, after = weights(base), weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {
        f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")
    }

    bad = [*argv[:6], str(tmp_path / "bad"), *argv[7:], "--lora-r", "4", "--lora-dropout", "1.5"]
    code = main(bad)
    err = capsys.readouterr().err
    assert (
        code == 2 and err.startswith("dem finetune: error: lora_dropout") and err.count("\n") == 1
    )


def test_a_real_lm_is_fine_tuned_with_lora_in_bf16_by_default(base, tmp_path, monkeypatch):
    # A base counts as a real LM from 20M parameters; lowered so the tiny base stands in for one.
    from dem import precision

    monkeypatch.setattr(precision, "LARGE_BASE_PARAMS", 1000)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    settings = {k: v for k, v in FAST.items() if k != "lr"}
    cost = finetune(base, tmp_path / "real", mixture=MIX, device="cpu", **settings)
    record = json.loads((tmp_path / "real" / "dem_train.json").read_text())
    assert record["parameters"]["lora_r"] == 8 and record["parameters"]["lr"] == 1e-3
    assert record["machine"]["dtype"] == "bfloat16"
    assert cost["trainable_params"] < cost["params"] / 3  # adapters only
    # Asked for: full fine-tuning in float32, at a real LM's full fine-tuning rate.
    finetune(base, tmp_path / "full", mixture=MIX, device="cpu", lora_r=0, dtype="float32",
             **settings)  # fmt: skip
    record = json.loads((tmp_path / "full" / "dem_train.json").read_text())
    assert record["parameters"]["lr"] == 2e-5 and "lora_r" not in record["parameters"]
    assert record["machine"]["dtype"] == "float32"


def test_bf16_training_follows_the_float32_loss(base, reference, tmp_path):
    # Autocast runs the matmuls in bf16 (weights and optimizer stay float32): a short run's
    # validation loss moves with float32's, within bf16's rounding.
    out, fp32 = reference
    bf16 = finetune(base, tmp_path / "bf16", mixture=MIX, dtype="bfloat16", **LORA)
    record = json.loads((tmp_path / "bf16" / "dem_train.json").read_text())
    assert record["machine"]["dtype"] == "bfloat16"
    first = json.loads((out / "dem_train.json").read_text())
    assert first["machine"]["dtype"] == "float32"
    assert bf16["final_val_loss"] == pytest.approx(fp32["final_val_loss"], rel=0.05)
    assert not same_weights(out, tmp_path / "bf16")  # bf16 did run
