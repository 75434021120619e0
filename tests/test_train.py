"""Training: loss goes down, exact resume, determinism, the DMix sampler, cost records, errors."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from _helpers_train import FAST, SOURCE_KWARGS, Interrupt, same_weights, weights

from dem import DemError
from dem.sources.pretraining import pretraining_text
from dem.training.finetune import finetune, use_gradient_checkpointing
from dem.training.pretrain import pretrain
from dem.training.schedule import build_schedule, parse_mixture, sample_sources
from dem.training.settings import FinetuneSettings, PretrainSettings

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run that several tests compare against."""
    out = tmp_path_factory.mktemp("ref") / "run"
    cost = finetune(base, out, mixture={"arithmetic": 1.0}, **FAST)
    return out, cost


def test_finished_run_is_a_model_folder_with_records(reference):
    out, cost = reference
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_log.csv"):
        assert (out / name).is_file(), name
    assert json.loads((out / "cost.json").read_text()) == cost
    record = json.loads((out / "dem_train.json").read_text())
    assert record["status"] == "finished" and record["parameters"]["steps"] == FAST["steps"]
    assert {"torch", "transformers", "accelerate"} <= set(record["versions"])
    # The shared provenance record: git commit and dirty flag, hardware, command, UTC time.
    assert (
        set(record["git"]) == {"commit", "dirty"}
        and record["git_commit"] == record["git"]["commit"]
    )
    assert (
        record["hardware"]["cpu_count"] >= 1 and record["command"] and record["time"].endswith("Z")
    )
    assert not (out / "checkpoint").exists() and not out.with_name("run.partial").exists()


def test_a_few_steps_lower_the_validation_loss(base, reference):
    from dem.evaluation.evaluate import response_loss
    from dem.models import load_model
    from dem.sources import get_source

    validation = get_source("arithmetic", **SOURCE_KWARGS).examples("validation")
    before = response_loss(*load_model(base), validation)
    after = response_loss(*load_model(reference[0]), validation)
    assert after < before - 0.5, (before, after)  # nats per token; untrained: equal
    log = pd.read_csv(reference[0] / "train_log.csv")
    val = log["val_loss"].dropna()
    assert len(val) == FAST["steps"] // FAST["eval_every"]
    assert val.iloc[-1] == pytest.approx(after, rel=1e-4)  # the log measures the same thing


def test_same_seed_gives_identical_weights_and_another_seed_does_not(base, reference, tmp_path):
    again = tmp_path / "again"
    finetune(base, again, mixture={"arithmetic": 1.0}, **FAST)
    assert same_weights(reference[0], again)
    other = tmp_path / "other"
    finetune(base, other, mixture={"arithmetic": 1.0}, **{**FAST, "seed": 1})
    assert not same_weights(reference[0], other)


@pytest.mark.parametrize("stop_at", [5, 8])  # between checkpoints, and right after one
def test_interrupted_run_resumes_to_the_same_weights(base, reference, tmp_path, stop_at):
    out = tmp_path / "run"

    def crash(step: int, row: dict) -> None:
        if step == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(base, out, mixture={"arithmetic": 1.0}, callback=crash, **FAST)
    partial = tmp_path / "run.partial"
    assert not out.exists() and (partial / "checkpoint" / "state.json").is_file()
    state = json.loads((partial / "checkpoint" / "state.json").read_text())
    assert state["step"] == stop_at // FAST["eval_every"] * FAST["eval_every"]

    cost = finetune(base, out, mixture={"arithmetic": 1.0}, **FAST)
    assert same_weights(reference[0], out)
    ref_log = pd.read_csv(reference[0] / "train_log.csv")
    log = pd.read_csv(out / "train_log.csv")
    assert log["step"].tolist() == list(range(1, FAST["steps"] + 1))
    pd.testing.assert_series_equal(log["loss"], ref_log["loss"])
    assert cost["train_tokens"] == reference[1]["train_tokens"]


def test_mixture_sampler_gives_each_source_its_exact_share():
    ratios = {"a": 0.6, "b": 0.3, "c": 0.1, "unused": 0.0}
    counts = Counter(sample_sources(ratios, 1000, seed=0))
    assert counts == {"a": 600, "b": 300, "c": 100}
    # Largest remainder: 10 slots at 1:1:1 give 4/3/3, never 3/3/3 or 4/4/3.
    assert sorted(Counter(sample_sources({"x": 1, "y": 1, "z": 1}, 10, seed=0)).values()) == [
        3,
        3,
        4,
    ]
    assert sample_sources(ratios, 50, seed=0) == sample_sources(
        {"c": 1, "a": 6, "b": 3}, 50, seed=0
    )  # scale and dict order do not matter
    assert sample_sources(ratios, 50, seed=0) != sample_sources(ratios, 50, seed=1)
    first = sample_sources({"a": 1, "b": 1}, 400, seed=0)
    assert 0 < first[:200].count("a") < 200, "slots must be shuffled, not in blocks"


def test_uniform_mixture_sees_exactly_the_examples_of_the_fine_tunes():
    lengths = {"a": [3, 5, 7, 9, 11] * 8, "b": [2, 4, 6, 8] * 10}
    settings = dict(batch_size=4, seed=0)
    alone = {
        name: build_schedule({name: lengths[name]}, {name: 1.0}, n_batches=15, **settings)
        for name in lengths
    }
    mixed = build_schedule(lengths, {"a": 1, "b": 1}, n_batches=30, **settings)
    assert sorted(p for b in mixed for p in b) == sorted(
        p for runs in alone.values() for b in runs for p in b
    )


def test_schedule_mixes_by_ratio_covers_each_source_evenly_and_buckets_lengths():
    lengths = {"short": [5 + i % 3 for i in range(40)], "long": [30 + i % 7 for i in range(25)]}
    schedule = build_schedule(
        lengths, {"short": 3, "long": 1}, n_batches=200, batch_size=16, seed=0
    )
    assert len(schedule) == 200 and all(len(b) == 16 for b in schedule)
    picks = [p for batch in schedule for p in batch]
    per_source = Counter(name for name, _ in picks)
    assert abs(per_source["short"] / len(picks) - 0.75) < 0.03
    # Every example of a source is used once per epoch before any repeats: counts differ by <= 1.
    for name, n in (("short", 40), ("long", 25)):
        uses = Counter(i for s, i in picks if s == name)
        assert set(uses) == set(range(n)) and max(uses.values()) - min(uses.values()) <= 1
    widths = [max(lengths[s][i] for s, i in b) for b in schedule]
    real = sum(lengths[s][i] for s, i in picks)
    assert 1 - real / sum(w * 16 for w in widths) < 0.10  # padding fraction
    again = build_schedule(lengths, {"short": 3, "long": 1}, n_batches=200, batch_size=16, seed=0)
    assert again == schedule


def test_cost_records_add_up(reference):
    out, cost = reference
    log = pd.read_csv(out / "train_log.csv")
    n_params = sum(t.numel() for k, t in weights(out).items() if k != "lm_head.weight")
    assert cost["params"] == n_params  # tied embeddings counted once
    assert cost["train_tokens"] == log["tokens"].sum()
    assert cost["flops"] == 6 * n_params * cost["train_tokens"]
    assert cost["steps"] == len(log) == FAST["steps"]
    assert cost["examples"] == FAST["steps"] * FAST["batch_size"]
    assert cost["response_tokens"] == log["response_tokens"].sum() < cost["train_tokens"]
    assert 0 < log["wall_s"].iloc[-1] <= cost["wall_s"]

    # Independently: the non-padding tokens of exactly the examples the schedule trained on.
    from dem.sources import get_source
    from dem.sources.data import build_tiny_tokenizer, encode_examples

    examples = get_source("arithmetic", **SOURCE_KWARGS).examples("train")
    encoded = encode_examples(build_tiny_tokenizer(), examples, FAST["max_length"])
    lengths = {"arithmetic": [len(e["input_ids"]) for e in encoded]}
    schedule = build_schedule(
        lengths,
        {"arithmetic": 1.0},
        n_batches=FAST["steps"],
        batch_size=FAST["batch_size"],
        seed=0,
    )
    assert cost["train_tokens"] == sum(lengths["arithmetic"][i] for b in schedule for _, i in b)


def test_mixture_run_logs_per_source_validation(base, tmp_path):
    cost = finetune(
        base,
        tmp_path / "mix",
        mixture={"arithmetic": 0.5, "word_edit": 0.5},
        **{**FAST, "steps": 4},
    )
    log = pd.read_csv(tmp_path / "mix" / "train_log.csv")
    assert {"val_loss_arithmetic", "val_loss_word_edit"} <= set(log.columns)
    assert cost["mixture"] == {"arithmetic": 0.5, "word_edit": 0.5}


def test_grad_accumulation_splits_the_same_batch(base, tmp_path):
    """2 micro-batches of 4 per step see the same tokens as batches of 8 (different grouping)."""
    a = finetune(base, tmp_path / "a", mixture={"arithmetic": 1.0}, **{**FAST, "steps": 4})
    b = finetune(
        base,
        tmp_path / "b",
        mixture={"arithmetic": 1.0},
        grad_accum=2,
        **{**FAST, "steps": 4, "batch_size": 4},
    )
    assert a["examples"] == b["examples"] == 32
    assert b["steps"] == 4 and math.isfinite(b["final_val_loss"])


# --- bad input -------------------------------------------------------------------------------


def test_unknown_source_names_the_known_ones(base, tmp_path):
    with pytest.raises(DemError, match="unknown source 'nope'.*arithmetic"):
        finetune(base, tmp_path / "x", mixture={"nope": 1.0}, **FAST)


@pytest.mark.parametrize(
    "mixture, message",
    [
        ({"arithmetic": -0.5, "facts": 1.0}, "ratio of 'arithmetic' must be a finite number >= 0"),
        ({"arithmetic": 0.0, "facts": 0}, "all zero"),
        ({"arithmetic": float("nan")}, "finite"),
        ({}, "empty"),
    ],
)
def test_bad_mixture_ratios(base, tmp_path, mixture, message):
    with pytest.raises(DemError, match=message):
        finetune(base, tmp_path / "x", mixture=mixture, **FAST)
    assert not (tmp_path / "x.partial").exists()


def test_parse_mixture():
    assert parse_mixture("a=0.5, b=0.25") == {"a": 0.5, "b": 0.25}
    for bad, message in (("a", "NAME=RATIO"), ("a=x", "not a number"), (" , ", "names no")):
        with pytest.raises(DemError, match=message):
            parse_mixture(bad)


def test_existing_output_folder(base, reference, tmp_path):
    out, cost = reference
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    # Same run, finished: the cached record comes back and nothing is retrained.
    assert finetune(base, out, mixture={"arithmetic": 1.0}, **FAST) == cost
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(DemError, match=r"holds a different run \(parameters differ: lr\)"):
        finetune(base, out, mixture={"arithmetic": 1.0}, **{**FAST, "lr": 1e-4})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DemError, match="exists and is not a dem training run"):
        finetune(base, foreign, mixture={"arithmetic": 1.0}, **FAST)
    fast = {**FAST, "steps": 2, "eval_every": 1}
    finetune(base, foreign, mixture={"arithmetic": 1.0}, overwrite=True, **fast)
    assert not (foreign / "notes.txt").exists() and (foreign / "cost.json").is_file()


def test_replace_redoes_a_changed_run_and_reuses_a_same_one(base, tmp_path):
    out = tmp_path / "r"
    fast = {**FAST, "steps": 2, "eval_every": 1}
    first = finetune(base, out, mixture={"arithmetic": 1.0}, **fast)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert finetune(base, out, mixture={"arithmetic": 1.0}, replace=True, **fast) == first
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    changed = finetune(base, out, mixture={"arithmetic": 1.0}, replace=True, **{**fast, "steps": 3})
    assert changed["steps"] == 3 and json.loads((out / "cost.json").read_text())["steps"] == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DemError, match="not a dem training run"):
        finetune(base, foreign, mixture={"arithmetic": 1.0}, replace=True, **fast)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_unfinished_run_with_other_parameters_is_refused(base, tmp_path):
    def crash(step: int, row: dict) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        finetune(base, tmp_path / "r", mixture={"arithmetic": 1.0}, callback=crash, **FAST)
    with pytest.raises(DemError, match="unfinished run .* different parameters \\(seed\\)"):
        finetune(base, tmp_path / "r", mixture={"arithmetic": 1.0}, **{**FAST, "seed": 3})


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(
    base, tmp_path, monkeypatch
):
    from dem import models as dem_models

    live = {}
    load_model = dem_models.load_model

    def capture(*args, **kwargs):  # keep a handle on the model the loop trains
        live["model"], tokenizer = load_model(*args, **kwargs)
        return live["model"], tokenizer

    def poison(step: int, row: dict) -> None:
        if step == 5:  # after the step-4 checkpoint, the weights go bad
            with torch.no_grad():
                next(live["model"].parameters()).fill_(float("nan"))

    monkeypatch.setattr(dem_models, "load_model", capture)
    with pytest.raises(DemError, match=r"loss became nan at step 6 .*checkpoint \(step 4\)"):
        finetune(base, tmp_path / "n", mixture={"arithmetic": 1.0}, callback=poison, **FAST)
    checkpoint = tmp_path / "n.partial" / "checkpoint"
    assert all(torch.isfinite(t).all() for t in weights(checkpoint).values())
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 4


def test_bad_numbers(base, tmp_path):
    for kwargs, message in (
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": -1.0}, "lr must be a positive number"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"max_length": 500}, "max_length=500 exceeds the model's max_position_embeddings=64"),
    ):
        with pytest.raises(DemError, match=message):
            finetune(base, tmp_path / "b", mixture={"arithmetic": 1.0}, **{**FAST, **kwargs})


def test_pretrain_is_cached_by_its_parameters(tmp_path):
    kwargs = dict(
        steps=3, batch_size=4, seq_len=32, hidden_size=32, num_layers=1, num_heads=2, progress=False
    )
    out = pretrain(tmp_path / "base", eval_every=2, **kwargs)
    cost = json.loads((out / "cost.json").read_text())
    assert cost["train_tokens"] == 3 * 4 * 32  # packed: no padding at all
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain(tmp_path / "base", eval_every=2, **kwargs) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(DemError, match="parameters differ: eval_every"):
        pretrain(tmp_path / "base", eval_every=3, **kwargs)


def test_pretraining_text_avoids_the_task_formats():
    text = " ".join(pretraining_text(20_000, seed=0))
    from dem.sources.data import PROMPT_SEPARATOR

    for marker in ("=", "+", "####", "[", "?", PROMPT_SEPARATOR.strip()):
        assert marker not in text, marker
    assert any(c.isdigit() for c in text) and any(c.isupper() for c in text)


def test_gradient_checkpointing_gives_the_same_weights(base, reference, tmp_path):
    out, _ = reference
    assert use_gradient_checkpointing(None, torch.device("cpu")) is False
    assert use_gradient_checkpointing(True, torch.device("cpu")) is True
    checkpointed = tmp_path / "gc"
    finetune(base, checkpointed, mixture={"arithmetic": 1.0}, gradient_checkpointing=True, **FAST)
    assert same_weights(out, checkpointed)


# --- settings, listed once -------------------------------------------------------------------


def test_default_settings_record_the_parameters_runs_have_always_recorded():
    # Written out by hand: a resumed or cached run compares exactly these (plus base, mixture,
    # sources and processes), so the defaults must not drift; they are the embedded default's
    # (dem/config.py), so `dem finetune` with no options trains a tiny base as chapter 02 does.
    assert FinetuneSettings().for_base(large=False).parameters() == {
        "steps": 200,
        "batch_size": 16,
        "lr": 2e-4,
        "warmup_steps": 20,
        "seed": 0,
        "grad_accum": 1,
        "eval_every": 100,
        "max_length": 128,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "save_every": 100,
    }
    lora = FinetuneSettings(lora_r=4, save_every=10).parameters()
    assert lora["save_every"] == 10
    assert {k: v for k, v in lora.items() if k.startswith("lora_")} == {
        "lora_r": 4,
        "lora_alpha": 8.0,
        "lora_dropout": 0.0,
        "lora_target": "all-linear",
    }
    assert PretrainSettings(hidden_size=64).parameters(corpus_version=4) == {
        "corpus_version": 4,
        "steps": 600,
        "batch_size": 16,
        "seq_len": 128,
        "lr": 1e-3,
        "warmup_steps": 30,
        "seed": 0,
        "hidden_size": 64,
        "num_layers": 4,
        "num_heads": 4,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "eval_every": 100,
    }


def test_settings_from_a_notebooks_parameters():
    params = {"finetune_steps": 400, "learning_rate": 2e-5, "batch_size": 32, "lora_r": 0}
    params |= {"pretrain_steps": 50, "seed": 3, "sources": ["arithmetic"], "n_train": 10}
    ft = FinetuneSettings.from_params(params)
    assert (ft.steps, ft.lr, ft.batch_size, ft.seed) == (400, 2e-5, 32, 3)
    assert FinetuneSettings.from_params(params, steps=600).steps == 600  # a per-source budget
    # Pretraining shares no knob with fine-tuning but the seed: its batch and lr stay its own.
    pre = PretrainSettings.from_params(params)
    assert (pre.steps, pre.seed, pre.batch_size, pre.lr) == (50, 3, 16, 1e-3)
    with pytest.raises(
        DemError, match=r"lr=0.001 and learning_rate=2e-05 disagree \(both set lr\)"
    ):
        FinetuneSettings.from_params({"lr": 1e-3, "learning_rate": 2e-5})


def test_unknown_or_bad_settings_name_the_parameter(base, tmp_path):
    with pytest.raises(DemError, match="unknown FinetuneSettings parameter.* learning_rate"):
        finetune(base, tmp_path / "x", mixture={"arithmetic": 1.0}, learning_rate=1e-3)
    assert not (tmp_path / "x.partial").exists()
    with pytest.raises(DemError, match="save_every must be a positive integer, got -1"):
        FinetuneSettings(save_every=-1)
    with pytest.raises(DemError, match="seq_len=64 exceeds max_position_embeddings=32"):
        PretrainSettings(seq_len=64, max_position_embeddings=32)
    settings = FinetuneSettings(steps=7)
    assert settings.updated(lr=2e-3) == FinetuneSettings(steps=7, lr=2e-3)
