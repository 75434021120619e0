"""Every command refuses bad input up front: one line on stderr naming the file, key or tensor
and what was expected, exit status 2, no traceback, nothing written.

One table: each case is the command line (``{name}`` placeholders are files the fixture
writes), the text the one line must contain, and nothing else. ``nothing created`` is checked
by listing the fixture's folder and the output folder before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers_merge import private_hash_cache, save_llama  # noqa: F401 (autouse fixture)
from _helpers_train import make_base

from dem.cli import main

torch.set_num_threads(1)

FAST = ["--steps", "2", "--batch-size", "4", "--n-train", "8", "--n-validation", "4",
        "--max-length", "32", "--no-progress", "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The inputs the cases name: a good base, broken models, sources and parameter files."""
    d = tmp_path_factory.mktemp("bad_input")
    base = make_base(d / "base")
    save_llama(d / "llama", hidden=32)
    save_llama(d / "wide", hidden=64)  # another width: every shape differs from llama's
    (d / "noweights").mkdir()
    (d / "noweights" / "config.json").write_text((base / "config.json").read_text())
    (d / "occupied").mkdir()
    (d / "occupied" / "thesis.tex").write_text("someone's work\n")
    rows = [{"q": f"double {i}", "a": str(2 * i)} for i in range(20)]
    good = "".join(json.dumps(r) + "\n" for r in rows)
    (d / "good.jsonl").write_text(good)
    (d / "broken.jsonl").write_text(good[:40] + "\n{not json\n" + good)
    (d / "notmapping.yaml").write_text("- seed\n")
    (d / "unknown.yaml").write_text("finetune_step: 400\n")
    (d / "typed.yaml").write_text("finetune_steps: '400'\n")
    (d / "strategy.yaml").write_text("search_strategy: gradient\n")
    (d / "broken.yaml").write_text("seed: [1\n")
    (d / "sweep_unknown.yaml").write_text("bases: [tiny-knowledge]\ncolour: red\n")
    (d / "finished" / "notebooks").mkdir(parents=True)
    (d / "finished" / "manifest.json").write_text('{"finished": "2026-01-01T00:00:00"}')
    (d / "notarun").mkdir()
    (d / "notarun" / "x.txt").write_text("x")
    names = {p.name.replace(".", "_"): str(p) for p in d.iterdir()}
    spec = {"name": "double", "prompt_template": "{q}", "response_field": "a"}
    names["spec_broken"] = json.dumps({**spec, "path": names["broken_jsonl"]})
    names["spec_missing"] = json.dumps({**spec, "path": str(d / "absent.jsonl")})
    names["spec_field"] = json.dumps({**spec, "path": names["good_jsonl"], "response_field": "b"})
    names["dir"] = str(d)
    return names


def _finetune(*extra: str) -> list[str]:
    return ["finetune", "--base", "{base}", "--out", "{out}", *FAST, *extra]


# (id, argv, text the one line must contain)
CASES = [
    # dem finetune
    (
        "ft-base-missing",
        ["finetune", "--base", "{dir}/nobase", "--source", "arithmetic", "--out", "{out}", *FAST],
        "nobase",
    ),
    (
        "ft-base-no-weights",
        ["finetune", "--base", "{noweights}", "--source", "arithmetic", "--out", "{out}", *FAST],
        "no weights",
    ),
    ("ft-unknown-source", _finetune("--source", "arithmetc"), "arithmetc"),
    ("ft-malformed-line", _finetune("--source", "{spec_broken}"), "broken.jsonl: line 2"),
    ("ft-source-file-missing", _finetune("--source", "{spec_missing}"), "absent.jsonl"),
    ("ft-source-field", _finetune("--source", "{spec_field}"), "'b'"),
    ("ft-source-json", _finetune("--source", "{{name"), "not valid JSON"),
    ("ft-mixture-ratio", _finetune("--mixture", "arithmetic=abc"), "abc"),
    ("ft-mixture-negative", _finetune("--mixture", "arithmetic=-1,word_edit=1"), "-1"),
    ("ft-steps-zero", _finetune("--source", "arithmetic", "--steps", "0"), "steps"),
    ("ft-lr-negative", _finetune("--source", "arithmetic", "--lr", "-1"), "lr"),
    ("ft-lora-negative", _finetune("--source", "arithmetic", "--lora-r", "-2"), "lora_r"),
    ("ft-threads-zero", _finetune("--source", "arithmetic", "--threads", "0"), "thread"),
    (
        "ft-max-length",
        _finetune("--source", "arithmetic", "--max-length", "4096"),
        "max_position_embeddings",
    ),
    (
        "ft-out-occupied",
        ["finetune", "--base", "{base}", "--source", "arithmetic", "--out", "{occupied}", *FAST],
        "occupied",
    ),
    (
        "ft-base-package",
        [
            "finetune",
            "--base",
            "package:no_such_pkg/m.gguf",
            "--source",
            "arithmetic",
            "--out",
            "{out}",
            *FAST,
        ],
        "no-such-pkg",
    ),
    (
        "ft-base-gguf-missing",
        [
            "finetune",
            "--base",
            "{dir}/absent.gguf",
            "--source",
            "arithmetic",
            "--out",
            "{out}",
            *FAST,
        ],
        "absent.gguf",
    ),
    # dem pretrain
    ("pt-steps-zero", ["pretrain", "--out", "{out}", "--steps", "0"], "steps"),
    (
        "pt-heads",
        ["pretrain", "--out", "{out}", "--hidden-size", "30", "--num-heads", "4"],
        "num_heads",
    ),
    ("pt-out-occupied", ["pretrain", "--out", "{occupied}", "--steps", "2"], "occupied"),
    # dem evaluate
    (
        "ev-model-missing",
        ["evaluate", "--model", "{dir}/nomodel", "--source", "arithmetic"],
        "nomodel",
    ),
    (
        "ev-model-no-weights",
        ["evaluate", "--model", "{noweights}", "--source", "arithmetic"],
        "no weights",
    ),
    (
        "ev-unknown-metric",
        ["evaluate", "--model", "{base}", "--source", "arithmetic", "--metrics", "loss,bleu"],
        "bleu",
    ),
    ("ev-unknown-source", ["evaluate", "--model", "{base}", "--source", "nosuch"], "nosuch"),
    (
        "ev-dtype",
        ["evaluate", "--model", "{base}", "--source", "arithmetic", "--dtype", "float16"],
        "--dtype 'float16'",
    ),
    (
        "ev-malformed-line",
        ["evaluate", "--model", "{base}", "--source", "{spec_broken}"],
        "broken.jsonl: line 2",
    ),
    (
        "ev-max-examples",
        ["evaluate", "--model", "{base}", "--source", "arithmetic", "--max-examples", "0"],
        "max_examples",
    ),
    (
        "ev-batch-size",
        ["evaluate", "--model", "{base}", "--source", "arithmetic", "--batch-size", "0"],
        "batch_size",
    ),
    (
        "ev-device",
        ["evaluate", "--model", "{base}", "--source", "arithmetic", "--device", "tpu"],
        "tpu",
    ),
    # dem sources
    ("src-unknown", ["sources", "show", "nosuch"], "nosuch"),
    ("src-malformed-line", ["sources", "show", "{spec_broken}"], "broken.jsonl: line 2"),
    ("src-n-zero", ["sources", "show", "arithmetic", "-n", "0"], "-n"),
    # dem vectors extract
    (
        "vec-shape",
        [
            "vectors",
            "extract",
            "--base",
            "{llama}",
            "--model",
            "{wide}",
            "--out",
            "{out}",
            "--no-progress",
        ],
        "shape",
    ),
    (
        "vec-model-missing",
        [
            "vectors",
            "extract",
            "--base",
            "{llama}",
            "--model",
            "{dir}/nomodel",
            "--out",
            "{out}",
            "--no-progress",
        ],
        "nomodel",
    ),
    (
        "vec-out-occupied",
        [
            "vectors",
            "extract",
            "--base",
            "{llama}",
            "--model",
            "{llama}",
            "--out",
            "{occupied}",
            "--no-progress",
        ],
        "occupied",
    ),
    # dem merge
    (
        "merge-shape",
        ["merge", "--base", "{llama}", "--model", "{wide}=0.5", "--out", "{out}", "--no-progress"],
        "shape",
    ),
    (
        "merge-architecture",
        ["merge", "--base", "{base}", "--model", "{llama}=0.5", "--out", "{out}", "--no-progress"],
        "llama",
    ),
    (
        "merge-shipped-base",
        ["merge", "--base", "dem:no-such-base", "--model", "{llama}=0.5", "--out", "{out}"],
        "dem:no-such-base",
    ),
    # dem run
    (
        "run-params-missing",
        ["run", "--params", "{dir}/nosuch.yaml", "--out", "{out}"],
        "nosuch.yaml",
    ),
    (
        "run-not-mapping",
        ["run", "--params", "{notmapping_yaml}", "--out", "{out}"],
        "expected a mapping",
    ),
    ("run-broken-yaml", ["run", "--params", "{broken_yaml}", "--out", "{out}"], "not valid YAML"),
    ("run-unknown-key", ["run", "--params", "{unknown_yaml}", "--out", "{out}"], "finetune_step"),
    ("run-typed", ["run", "--params", "{typed_yaml}", "--out", "{out}"], "finetune_steps"),
    ("run-choice", ["run", "--params", "{strategy_yaml}", "--out", "{out}"], "search_strategy"),
    ("run-set", ["run", "--params", "smoke", "--set", "n_test=0", "--out", "{out}"], "n_test"),
    ("run-out-occupied", ["run", "--params", "smoke", "--out", "{occupied}"], "occupied"),
    ("run-only-unknown", ["run", "--params", "smoke", "--only", "99", "--out", "{out}"], "99"),
    # dem seeds
    ("seeds-params", ["seeds", "--params", "{unknown_yaml}", "--out", "{out}"], "finetune_step"),
    ("seeds-out-occupied", ["seeds", "--params", "smoke", "--out", "{occupied}"], "occupied"),
    ("seeds-repeated", ["seeds", "--params", "smoke", "--seeds", "1", "1", "--out", "{out}"], "1"),
    # dem publish
    ("publish-not-a-run", ["publish", "{notarun}", "--out", "{out}"], "notarun"),
    ("publish-missing", ["publish", "{dir}/norun", "--out", "{out}"], "norun"),
    ("publish-out-occupied", ["publish", "{finished}", "--out", "{occupied}"], "occupied"),
    # dem config
    ("config-unknown-key", ["config", "--params", "{unknown_yaml}"], "finetune_step"),
    # dem sweep
    (
        "sweep-missing",
        ["sweep", "--params", "{dir}/nosweep.yaml", "--out", "{out}"],
        "nosweep.yaml",
    ),
    (
        "sweep-unknown-key",
        ["sweep", "--params", "{sweep_unknown_yaml}", "--out", "{out}"],
        "colour",
    ),
    ("sweep-out-occupied", ["sweep", "--params", "sweep-smoke", "--out", "{occupied}"], "occupied"),
]


def _listing(folder: Path) -> set[tuple[str, int]]:
    return {(str(p), p.stat().st_size) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(files, tmp_path, capsys, monkeypatch, argv, expected):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # a default output folder (runs/...) would land here
    argv = [a.format(out=out, **files) for a in argv]
    before = _listing(Path(files["dir"])), _listing(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert (_listing(Path(files["dir"])), _listing(tmp_path)) == before


def test_a_bug_still_shows_its_traceback(monkeypatch):
    """Only user errors (DemError) become one line; anything else is a bug and propagates."""
    import dem.sources

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(dem.sources, "list_sources", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sources", "list"])
