"""`dem merge` / `dem vectors extract` end to end: results, bad input, interruption."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from _helpers_merge import load_weights, private_hash_cache, save_llama  # noqa: F401 (autouse fixture)
from safetensors.torch import load_file, save_file

from dem.cli import main

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli_zoo")
    base = save_llama(d / "base")
    return {"base": base, "m1": save_llama(d / "m1", base=base, seed=1),
            "m2": save_llama(d / "m2", base=base, seed=2)}  # fmt: skip


def _fail(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI, expect exit 2 and one stderr line containing every expected string."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.dem-")]


def _args(zoo, out, *models: str, extra=()) -> list[str]:
    argv = ["merge", "--base", str(zoo["base"]), "--out", str(out), "--no-progress", *extra]
    for m in models:
        argv += ["--model", m]
    return argv


def test_cli_merge_and_vectors(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(zoo, out, f"{zoo['m1']}=0.25", f"{zoo['m2']}=0.5")) == 0
    assert capsys.readouterr().out.strip() == str(out)
    b, m1, m2 = (load_weights(zoo[k]) for k in ("base", "m1", "m2"))
    got = load_weights(out)
    for k in b:
        assert abs(got[k] - (b[k] + 0.25 * (m1[k] - b[k]) + 0.5 * (m2[k] - b[k]))).max() < 1e-6
    vec = tmp_path / "v1"
    argv = ["vectors", "extract", "--base", str(zoo["base"]), "--model", str(zoo["m1"])]
    assert main([*argv, "--out", str(vec), "--no-progress"]) == 0
    out2 = tmp_path / "out2"
    assert main(_args(zoo, out2, f"{vec}=0.25", f"{zoo['m2']}=0.5")) == 0
    assert (
        load_file(out2 / "model.safetensors").keys() == load_file(out / "model.safetensors").keys()
    )
    record = json.loads((out2 / "dem_merge.json").read_text())
    assert [m["kind"] for m in record["models"]] == ["vector", "model"]


def test_config_file_and_flag_override(zoo, tmp_path, capsys):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        base: {zoo["base"]}
        out: {tmp_path / "from_yaml"}
        method: ties
        density: 0.5
        models:
          - {zoo["m1"]}=0.5
          - path: {zoo["m2"]}
            weight: 0.5
        """))  # fmt: skip
    assert main(["merge", "--config", str(cfg), "--no-progress"]) == 0
    record = json.loads((tmp_path / "from_yaml" / "dem_merge.json").read_text())
    assert record["method"] == "ties" and record["parameters"]["density"] == 0.5
    assert record["weights"] == [0.5, 0.5]
    # flags win over the file
    argv = ["merge", "--config", str(cfg), "--no-progress", "--density", "0.9"]
    assert main([*argv, "--out", str(tmp_path / "flag")]) == 0
    assert (
        json.loads((tmp_path / "flag" / "dem_merge.json").read_text())["parameters"]["density"]
        == 0.9
    )
    cfg.write_text(f"base: {zoo['base']}\nout: {tmp_path / 'x'}\nweights: [1]\n")
    _fail(capsys, ["merge", "--config", str(cfg)], "unknown key 'weights'")


@pytest.mark.parametrize(
    ("model_spec", "expected"),
    [
        ("{m1}=abc", ["'abc'", "not a finite number"]),
        ("{m1}=nan", ["'nan'", "not a finite number"]),
        ("{m1}=inf", ["'inf'", "not a finite number"]),
        ("{m1}", ["expected PATH=WEIGHT"]),
        ("{tmp}/missing=0.5", ["missing", "does not exist"]),
        ("{tmp}/empty=0.5", ["empty", "has no weights", "model.safetensors"]),
        ("{tmp}/binonly=0.5", ["binonly", "pytorch_model.bin", "convert to safetensors"]),
        ("{tmp}/garbage=0.5", ["garbage", "not a safetensors file"]),
        ("{tmp}/afile=0.5", ["afile", "is not a folder"]),
        ("{tmp}/truncated=0.5", ["truncated", "does not fit its byte range"]),
    ],
)
def test_bad_model_specs(zoo, tmp_path, capsys, model_spec, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "binonly").mkdir()
    (tmp_path / "binonly" / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "truncated").mkdir()
    data = (zoo["m1"] / "model.safetensors").read_bytes()
    (tmp_path / "truncated" / "model.safetensors").write_bytes(data[:-100])
    out = tmp_path / "out"
    spec = model_spec.format(m1=zoo["m1"], tmp=tmp_path)
    _fail(capsys, _args(zoo, out, spec), *expected)
    _no_output(out)


def test_bad_base_no_models_and_existing_output(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["merge", "--base", str(tmp_path / "nobase"), "--out", str(out)]
    _fail(capsys, [*argv, "--model", f"{zoo['m1']}=1"], "base folder", "nobase", "does not exist")
    _fail(capsys, ["merge", "--base", str(zoo["base"]), "--out", str(out)], "no models given")
    _fail(capsys, _args(zoo, out, f"{zoo['m1']}=1", extra=["--density", "0.5"]),
          "--density", "does not apply", "'dem'")  # fmt: skip
    _fail(capsys, _args(zoo, out, f"{zoo['m1']}=1", extra=["--method", "ties", "--density", "0"]),
          "--density 0.0 must be in (0, 1]")  # fmt: skip
    # the library names parameters; the command line speaks of its flags
    _fail(capsys, _args(zoo, out, f"{zoo['m1']}=1", extra=["--method", "dare_linear", "--drop-prob", "1"]),
          "--drop-prob 1.0 must be in [0, 1)")  # fmt: skip
    _fail(capsys, _args(zoo, out, f"{zoo['m1']}=1", extra=["--lambda", "2"]),
          "--lambda does not apply to method 'dem'")  # fmt: skip
    _no_output(out)
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fail(capsys, _args(zoo, out, f"{zoo['m1']}=1"), str(out), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite with a failing merge keeps the old output; a successful one replaces it
    _fail(
        capsys,
        _args(zoo, out, f"{zoo['m1']}=1", f"{tmp_path}/nope=1", extra=["--overwrite"]),
        "nope",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(_args(zoo, out, f"{zoo['m1']}=1", extra=["--overwrite"])) == 0
    assert (out / "dem_merge.json").exists() and not (out / "keep.txt").exists()


def test_new_methods_take_their_flags_and_model_counts(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    two = (f"{zoo['m1']}=0.5", f"{zoo['m2']}=0.5")
    extra = ["--method", "breadcrumbs", "--density", "0.8", "--gamma", "0.05"]
    assert main(_args(zoo, out, *two, extra=extra)) == 0
    record = json.loads((out / "dem_merge.json").read_text())
    assert record["parameters"] == {"lam": 1.0, "density": 0.8, "gamma": 0.05}
    _fail(capsys, _args(zoo, tmp_path / "s", *two, extra=["--method", "slerp"]),
          "'slerp' takes exactly 1 model(s) besides the base, got 2")  # fmt: skip
    _fail(capsys, _args(zoo, tmp_path / "d", *two, extra=["--method", "della", "--epsilon", "0.6"]),
          "--epsilon 0.6 must be in [0, 0.5)")  # fmt: skip
    _fail(capsys, _args(zoo, tmp_path / "g", *two, extra=["--gamma", "0.1"]),
          "--gamma does not apply to method 'dem' (only to breadcrumbs, breadcrumbs_ties)")  # fmt: skip
    _no_output(tmp_path / "s")


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    edit(weights)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_mismatched_tensors_and_nan(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    name = "model.layers.1.mlp.up_proj.weight"

    def reshape(w):
        w[name] = w[name][:-1]

    def drop(w):
        del w[name]

    def extra(w):
        w["model.extra.weight"] = torch.zeros(2)

    def nan(w):
        w[name][3, 4] = math.nan

    def inf(w):
        w[name][0, 0] = -math.inf

    shaped = _edited_copy(zoo["m1"], tmp_path / "shaped", reshape)
    _fail(
        capsys, _args(zoo, out, f"{shaped}=1"), repr(name), "shape [63, 32]", "[64, 32]", "shaped"
    )
    missing = _edited_copy(zoo["m1"], tmp_path / "missing", drop)
    _fail(capsys, _args(zoo, out, f"{missing}=1"), "has no tensor", repr(name), "missing")
    more = _edited_copy(zoo["m1"], tmp_path / "more", extra)
    _fail(capsys, _args(zoo, out, f"{more}=1"), "'model.extra.weight'", "base", "lacks")
    for edit in (nan, inf):
        bad = _edited_copy(zoo["m1"], tmp_path / edit.__name__, edit)
        file = str(bad / "model.safetensors")
        for method in ("dem", "ties"):
            argv = _args(zoo, out, f"{zoo['m2']}=0.5", f"{bad}=0", extra=["--method", method])
            _fail(capsys, argv, file, repr(name), "NaN or Inf")
    _no_output(out)


SLOW_MERGE = """
import signal, sys, time
# A background job (nohup, CI runners) may start with SIGINT ignored: take Python's default.
signal.signal(signal.SIGINT, signal.default_int_handler)
from dem.merging import safetensors_io
from dem.cli import main
write = safetensors_io.ShardedWriter.write_chunks
def slow(self, name, chunks):
    write(self, name, chunks)
    print("writing", flush=True)
    time.sleep(5)  # a merge that takes long enough to be interrupted (seconds: CI may be busy)
safetensors_io.ShardedWriter.write_chunks = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_killed_merge_leaves_no_output(zoo, tmp_path, sig):
    out = tmp_path / "out"
    argv = _args(zoo, out, f"{zoo['m1']}=0.5")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "writing"  # mid-merge: the temporary folder exists
    assert [p for p in tmp_path.iterdir() if ".dem-tmp-" in p.name]
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if ".dem-tmp-" in p.name]
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert len(leftovers) == 1  # cannot be caught; clearly temporary, and ...
        assert main(argv) == 0  # ... the next merge to the same output cleans it up
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    else:
        assert code == (143 if sig == signal.SIGTERM else 130), proc.stderr.read()
        assert leftovers == []
        assert "Traceback" not in proc.stderr.read()


def test_python_m_dem_merge_imports_no_transformers(zoo, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-X", "importtime", "-m", "dem", *_args(zoo, out, f"{zoo['m1']}=0.5")]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" in imported
    assert not {"transformers", "datasets", "pandas", "accelerate"} & imported
    assert (out / "dem_merge.json").exists(), time.perf_counter() - t


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for option in ("--base", "--model", "--out", "--method", "--dtype", "--density", "--drop-prob",
                   "--lambda", "--seed", "--gamma", "--epsilon", "--overwrite", "--config",
                   "--compute-dtype", "--max-shard-size", "--no-progress", "LoRA adapter"):  # fmt: skip
        assert option in text, option
    from dem.merging.methods import METHODS

    for method in METHODS.values():  # choices and formulas come from the method records
        assert method.name in text and method.formula in text, method.name
