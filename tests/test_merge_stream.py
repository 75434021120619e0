"""The streaming driver end to end on tiny random Llama models built in a temporary folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_merge import (  # noqa: F401 (private_hash_cache: autouse fixture)
    load_weights,
    private_hash_cache,
    reference,
    save_llama,
    weight_dtypes,
)
from safetensors.torch import load_file, save_file

from dem import DemError
from dem.merging import merge as M
from dem.merging.methods import METHODS, resolve_params, tensor_seed
from dem.merging.vectors import extract_vector, load_vector, vector_info

torch.set_num_threads(1)
W = [0.7, -0.2]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """fp32 base + 2 fine-tunes (one sharded); tied; bf16; all tiny (hidden 32, 2 layers)."""
    d = tmp_path_factory.mktemp("zoo")
    z = {"base": save_llama(d / "base")}
    z["m1"] = save_llama(d / "m1", base=z["base"], seed=1)
    z["m2"] = save_llama(d / "m2", base=z["base"], seed=2, max_shard_size="30KB")
    z["tied"] = save_llama(d / "tied", tied=True, seed=3)
    z["tied1"] = save_llama(d / "tied1", base=z["tied"], seed=4)
    z["tied2"] = save_llama(d / "tied2", base=z["tied"], seed=5)
    z["bf"] = save_llama(d / "bf", dtype=torch.bfloat16, seed=6)
    z["bf1"] = save_llama(d / "bf1", base=z["bf"], seed=7, dtype=torch.bfloat16)
    z["bf2"] = save_llama(d / "bf2", base=z["bf"], seed=8, dtype=torch.bfloat16)
    return z


def _reference(method: str, base: dict, models: list[dict], w, seed=0, **p) -> dict:
    """float64 numpy reference for every tensor (random draws taken from torch by seed)."""
    p = resolve_params(METHODS[method], p)
    return {name: reference(method, b, [m[name] for m in models], w, p, tensor_seed(seed, name))
            for name, b in base.items()}  # fmt: skip


def _assert_close(got: dict, ref: dict, atol=1e-6):
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=atol, rtol=0, err_msg=name)


CASES = [
    ("dem", {}),
    ("linear", {}),
    ("task_arithmetic", {"lam": 0.5}),
    ("ties", {"density": 0.3, "lam": 1.2}),
    ("dare_linear", {"drop_prob": 0.4}),
    ("dare_ties", {"drop_prob": 0.4, "density": 0.6}),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.7, "gamma": 0.1, "lam": 1.3}),
    ("della", {"density": 0.6, "epsilon": 0.2}),
    ("della_linear", {"density": 0.5, "epsilon": 0.1}),
    ("model_stock", {}),
    ("slerp", {}),
]


def _models(zoo, method):
    """The inputs a method takes here: slerp one model, at t = 0.4; ties-like positive weights."""
    if method == "slerp":
        return [(zoo["m1"], 0.4)]
    w = W if method in ("dem", "linear", "task_arithmetic", "dare_linear") else [0.7, 0.4]
    return [(zoo["m1"], w[0]), (zoo["m2"], w[1])]


@pytest.mark.parametrize(("method", "params"), CASES, ids=[c[0] for c in CASES])
def test_every_method_streams_to_the_float64_reference(zoo, tmp_path, monkeypatch, method, params):
    # blocks of 3 rows (96 elements): every matrix is merged over several blocks and passes
    monkeypatch.setattr(M, "CHUNK", 96)
    models = _models(zoo, method)
    w = [x for _, x in models]
    out = M.merge(zoo["base"], models, tmp_path / "out", method=method, seed=3, progress=False,
                  **params)  # fmt: skip
    ref = _reference(method, load_weights(zoo["base"]), [load_weights(p) for p, _ in models], w,
                     seed=3, **params)  # fmt: skip
    _assert_close(load_weights(out), ref)
    record = json.loads((out / "dem_merge.json").read_text())
    assert record["method"] == method and record["weights"] == w
    assert params.items() <= record["parameters"].items()
    assert record["parameters"].get("seed") == (3 if METHODS[method].random else None)


def test_output_loads_and_is_sharded_with_copied_files(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    out = M.merge(zoo["base"], [(zoo["m1"], W[0]), (zoo["m2"], W[1])], tmp_path / "out",
                  max_shard_size="20KB", progress=False)  # fmt: skip
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").exists()
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (out / name).read_bytes() == (zoo["base"] / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = _reference("dem", load_weights(zoo["base"]),
                     [load_weights(zoo["m1"]), load_weights(zoo["m2"])], W)  # fmt: skip
    _assert_close({k: v.double().numpy() for k, v in model.state_dict().items()}, ref)
    # provenance: the recorded hashes are the files' plain sha256, including out-of-order shards
    record = json.loads((out / "dem_merge.json").read_text())
    for entry in [record["base"], *record["models"]]:
        for file, digest in entry["sha256"].items():
            assert hashlib.sha256((Path(entry["path"]) / file).read_bytes()).hexdigest() == digest
    assert record["versions"]["dem"] and record["compute_dtype"] == "float32"
    assert {"git", "hardware", "command", "time"} <= set(record)  # the shared provenance


def test_tied_embeddings(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    assert "lm_head.weight" not in load_weights(zoo["tied"])
    out = M.merge(zoo["tied"], [(zoo["tied1"], W[0]), (zoo["tied2"], W[1])], tmp_path / "out",
                  progress=False)  # fmt: skip
    ref = _reference("dem", load_weights(zoo["tied"]),
                     [load_weights(zoo["tied1"]), load_weights(zoo["tied2"])], W)  # fmt: skip
    _assert_close(load_weights(out), ref)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_base_with_tied_model_uses_its_embedding(zoo, tmp_path):
    # a tied fine-tune of an untied base: its output layer *is* its embedding
    d = tmp_path / "tied_ft"
    d.mkdir()
    sd = load_file(zoo["m1"] / "model.safetensors")
    sd.pop("lm_head.weight")
    save_file(sd, d / "model.safetensors")
    config = json.loads((zoo["m1"] / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    out = M.merge(zoo["base"], [(d, 0.5)], tmp_path / "out", progress=False)
    b, m = load_weights(zoo["base"]), load_weights(zoo["m1"])
    m["lm_head.weight"] = m["model.embed_tokens.weight"]
    _assert_close(load_weights(out), _reference("dem", b, [m], [0.5]))


def _edited_copy(src: Path, dst: Path, edit, **config) -> Path:
    """A copy of the single-file model ``src`` with ``edit`` applied to its state dict."""
    dst.mkdir()
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    (dst / "config.json").write_text(
        json.dumps({**json.loads((src / "config.json").read_text()), **config})
    )
    return dst


def test_nan_and_overflow_are_traced_to_their_origin(zoo, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"

    def nan(sd):
        sd[name][1, 2] = float("nan")

    # DEM checks only the merged block, then searches the inputs: a NaN in the base is the
    # base's, although every v_i = θ_i − θ0 carries it too
    bad_base = _edited_copy(zoo["base"], tmp_path / "bad_base", nan)
    with pytest.raises(DemError) as err:
        M.merge(bad_base, [(zoo["m1"], 0.5)], tmp_path / "out", progress=False)
    assert (
        str(err.value) == f"{bad_base / 'model.safetensors'}: tensor {name!r} contains NaN or Inf"
    )

    # a tied fine-tune of an untied base: the base's lm_head is the model's embedding
    def tied_nan(sd):
        sd.pop("lm_head.weight")
        sd["model.embed_tokens.weight"][0, 0] = float("nan")

    tied = _edited_copy(zoo["m1"], tmp_path / "tied_ft", tied_nan, tie_word_embeddings=True)
    with pytest.raises(DemError) as err:
        M.merge(zoo["base"], [(zoo["m2"], 0.5), (tied, 0.5)], tmp_path / "out", progress=False)
    embed = "model.embed_tokens.weight"
    assert str(err.value) == f"{tied / 'model.safetensors'}: tensor {embed!r} contains NaN or Inf"

    # finite inputs whose float32 sum is not: the weights are to blame
    with pytest.raises(DemError) as err:
        M.merge(zoo["base"], [(zoo["m1"], 1e39)], tmp_path / "out", progress=False)
    assert "overflows: use smaller weights or a float64 compute dtype" in str(err.value)
    assert not (tmp_path / "out").exists()

    # a finite result whose sum overflows float32 is a result, not an overflow
    def huge(sd):
        sd[name].fill_(3e38)

    big_base, big_ft = (_edited_copy(zoo[k], tmp_path / f"big_{k}", huge) for k in ("base", "m1"))
    out = M.merge(big_base, [(big_ft, 0.5)], tmp_path / "big_out", progress=False)
    assert torch.equal(
        load_file(out / "model.safetensors")[name], load_file(big_ft / "model.safetensors")[name]
    )


def test_bf16_base_keeps_dtype_computes_in_fp32(zoo, tmp_path):
    models = [(zoo["bf1"], W[0]), (zoo["bf2"], W[1])]
    out = M.merge(zoo["bf"], models, tmp_path / "out", progress=False)
    assert set(weight_dtypes(out).values()) == {torch.bfloat16}
    base, m1, m2 = (load_file(zoo[k] / "model.safetensors") for k in ("bf", "bf1", "bf2"))
    got = load_file(out / "model.safetensors")
    for name, b in base.items():
        # exactly the fp32 arithmetic of the pure function, cast once at the end ...
        fp32 = METHODS["dem"](b.float(), [m1[name].float(), m2[name].float()], W)
        fp32 = fp32.to(torch.bfloat16)
        assert torch.equal(got[name], fp32), name
        # ... which is within one bf16 rounding of the float64 reference (bf16 arithmetic is not)
        ref = _reference("dem", {name: b.double().numpy()},
                         [{name: m1[name].double().numpy()}, {name: m2[name].double().numpy()}], W)  # fmt: skip
        err = np.abs(got[name].double().numpy() - ref[name])
        assert (err <= 2**-8 * np.abs(ref[name]) + 1e-7).all(), name
    out32 = M.merge(zoo["bf"], models, tmp_path / "out32", dtype="float32", progress=False)
    assert set(weight_dtypes(out32).values()) == {torch.float32}
    assert json.loads((out32 / "config.json").read_text())["dtype"] == "float32"


def test_integer_and_bool_tensors_are_copied_from_base(tmp_path):
    def folder(name, seed):
        g = torch.Generator().manual_seed(seed)
        d = tmp_path / name
        d.mkdir()
        save_file({"w": torch.randn(4, 3, generator=g), "ids": torch.arange(5) + seed,
                   "mask": torch.rand(6, generator=g) > 0.5}, d / "model.safetensors")  # fmt: skip
        return d

    base, m1, m2 = folder("base", 0), folder("m1", 1), folder("m2", 2)
    for method, params in CASES:
        models = [(m1, 0.5)] if method == "slerp" else [(m1, 0.5), (m2, 0.5)]
        out = M.merge(base, models, tmp_path / method, method=method, progress=False, **params)
        got, want = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
        assert torch.equal(got["ids"], want["ids"]) and got["ids"].dtype == torch.int64
        assert torch.equal(got["mask"], want["mask"]) and got["mask"].dtype == torch.bool


def test_vectors_round_trip_and_merge_from_vectors(zoo, tmp_path):
    v1 = extract_vector(zoo["base"], zoo["m1"], tmp_path / "v1", progress=False)
    v2 = extract_vector(zoo["base"], zoo["m2"], tmp_path / "v2", progress=False)
    b, m1 = load_weights(zoo["base"]), load_weights(zoo["m1"])
    vec = load_vector(v1)
    with pytest.raises(DemError, match=f"{zoo['m1']} is not a vector folder"):
        load_vector(zoo["m1"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dem_vector.json").write_text((v1 / "dem_vector.json").read_text())
    with pytest.raises(DemError, match=f"^vector folder {empty} has no weights: expected vector"):
        load_vector(empty)
    assert set(vec) == set(b)
    for name, v in vec.items():
        assert v.dtype == torch.float32
        np.testing.assert_allclose(v.double().numpy(), m1[name] - b[name], atol=1e-7, rtol=0)
    info = vector_info(v1)
    assert info["dem_kind"] == "distribution_vector" and info["dtype"] == "float32"
    assert info["format"] == "dem distribution vector v = theta_source - theta_base"
    assert info["base_sha256"] == {
        "model.safetensors": hashlib.sha256(
            (zoo["base"] / "model.safetensors").read_bytes()
        ).hexdigest()
    }
    from safetensors import safe_open

    with safe_open(v1 / "vector.safetensors", "pt") as f:
        assert f.metadata()["dem_kind"] == "distribution_vector"
    with pytest.raises(DemError, match="already exists"):  # never overwritten unless asked
        extract_vector(zoo["base"], zoo["m1"], v1, progress=False)
    before = load_vector(v1)
    assert extract_vector(zoo["base"], zoo["m1"], v1, progress=False, overwrite=True) == v1
    assert all(torch.equal(before[k], t) for k, t in load_vector(v1).items())
    (tmp_path / "no_weights").mkdir()
    with pytest.raises(DemError, match=r"^base folder .*no_weights has no weights"):
        extract_vector(tmp_path / "no_weights", zoo["m1"], tmp_path / "v_none", progress=False)
    small = extract_vector(zoo["base"], zoo["m1"], tmp_path / "v_small", progress=False,
                           max_shard_size=4096)  # fmt: skip
    assert len(list(small.glob("vector-*.safetensors"))) > 1
    assert all(torch.equal(before[k], t) for k, t in load_vector(small).items())
    with pytest.raises(DemError, match="is already a vector folder"):
        extract_vector(zoo["base"], v1, tmp_path / "vv", progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    for folder in ("base", "m1"):  # a NaN is named in the folder that holds it
        bad = _edited_copy(
            zoo[folder], tmp_path / f"nan_{folder}", lambda sd: sd[name].fill_(float("nan"))
        )
        args = (bad, zoo["m1"]) if folder == "base" else (zoo["base"], bad)
        with pytest.raises(DemError) as err:
            extract_vector(*args, tmp_path / f"v_{folder}", progress=False)
        assert str(err.value) == f"{bad / 'model.safetensors'}: tensor {name!r} contains NaN or Inf"
    assert info["base"] == str(zoo["base"].resolve()) and info["source"] == str(zoo["m1"].resolve())
    assert info["source_sha256"] == {
        "model.safetensors": hashlib.sha256(
            (zoo["m1"] / "model.safetensors").read_bytes()
        ).hexdigest()
    }
    # v = θ_i − θ0 of two fp32 tensors is exact in float64, so the rounded vector equals the
    # fp32 difference the model path computes: merging vectors is bitwise the same merge
    models = [(zoo["m1"], W[0]), (zoo["m2"], W[1])]
    a = M.merge(zoo["base"], models, tmp_path / "a", progress=False)
    c = M.merge(zoo["base"], [(v1, W[0]), (v2, W[1])], tmp_path / "c", progress=False)
    for name, t in load_file(a / "model.safetensors").items():
        assert torch.equal(t, load_file(c / "model.safetensors")[name]), name
    mixed = M.merge(zoo["base"], [(zoo["m1"], 0.5), (v2, 0.5)], tmp_path / "lin", method="linear",
                    progress=False)  # fmt: skip
    m2 = load_weights(zoo["m2"])
    _assert_close(load_weights(mixed), {k: 0.5 * m1[k] + 0.5 * m2[k] for k in b})


def test_float64_compute_and_dare_seed_determinism(zoo, tmp_path):
    models = [(zoo["m1"], 1 / 3), (zoo["m2"], 1 / 3)]
    out = M.merge(zoo["base"], models, tmp_path / "f64", compute_dtype=torch.float64,
                  dtype="float64", progress=False)  # fmt: skip
    ref = _reference("dem", load_weights(zoo["base"]),
                     [load_weights(zoo["m1"]), load_weights(zoo["m2"])], [1 / 3, 1 / 3])  # fmt: skip
    _assert_close(load_weights(out), ref, atol=1e-14)
    kw = dict(method="dare_ties", drop_prob=0.5, progress=False)
    a = M.merge(zoo["base"], models, tmp_path / "a", seed=1, **kw)
    b = M.merge(zoo["base"], models, tmp_path / "b", seed=1, **kw)
    c = M.merge(zoo["base"], models, tmp_path / "c", seed=2, **kw)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)


def test_overwrite_replaces_only_complete_outputs(zoo, tmp_path):
    out = tmp_path / "out"
    M.merge(zoo["base"], [(zoo["m1"], 0.5)], out, progress=False)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(DemError, match="already exists"):
        M.merge(zoo["base"], [(zoo["m1"], 0.9)], out, progress=False)
    with pytest.raises(DemError, match="does not exist"):
        M.merge(zoo["base"], [(tmp_path / "nope", 0.9)], out, overwrite=True, progress=False)
    assert (out / "model.safetensors").read_bytes() == before
    M.merge(zoo["base"], [(zoo["m1"], 0.9)], out, overwrite=True, progress=False)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_failure_mid_merge_leaves_nothing(zoo, tmp_path, monkeypatch):
    from dem.merging import safetensors_io

    calls = {"n": 0}
    original = safetensors_io.ShardedWriter.write_chunks

    def failing_write(self, name, chunks):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (injected)")
        return original(self, name, chunks)

    monkeypatch.setattr(safetensors_io.ShardedWriter, "write_chunks", failing_write)
    with pytest.raises(OSError, match="injected"):
        M.merge(zoo["base"], [(zoo["m1"], 0.5)], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_tied_base_with_model_storing_lm_head(zoo, tmp_path):
    # a tied base; the fine-tune stores lm_head too: fine when it is the embedding, else refused
    def variant(name: str, head) -> Path:
        d = tmp_path / name
        d.mkdir()
        sd = load_file(zoo["tied1"] / "model.safetensors")
        sd["lm_head.weight"] = head(sd["model.embed_tokens.weight"])
        save_file(sd, d / "model.safetensors")
        (d / "config.json").write_bytes((zoo["tied1"] / "config.json").read_bytes())
        return d

    same = variant("same", lambda e: e.clone())
    out = M.merge(zoo["tied"], [(same, 0.5)], tmp_path / "out", progress=False)
    ref = _reference("dem", load_weights(zoo["tied"]), [load_weights(zoo["tied1"])], [0.5])
    _assert_close(load_weights(out), ref)
    other = variant("other", lambda e: e + 1)
    with pytest.raises(DemError, match="ties it to 'model.embed_tokens.weight'"):
        M.merge(zoo["tied"], [(other, 0.5)], tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_hash_cache_follows_file_changes(zoo, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for f in zoo["m1"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    sha = lambda: json.loads((out / "dem_merge.json").read_text())["models"][0]["sha256"]  # noqa: E731
    out = M.merge(zoo["base"], [(d, 0.5)], tmp_path / "a", progress=False)
    first = sha()
    out = M.merge(zoo["base"], [(d, 0.5)], tmp_path / "b", progress=False)
    assert sha() == first  # from the cache this time
    weights = load_file(d / "model.safetensors")
    weights["model.norm.weight"][0] += 1
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    out = M.merge(zoo["base"], [(d, 0.5)], tmp_path / "c", progress=False)
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert sha() == {"model.safetensors": digest} != first


def test_streamed_and_in_memory_merges_are_the_same_computation(zoo, tmp_path, monkeypatch):
    """From the same vectors, dem merge (in blocks of 3 rows) and the in-memory search (whole
    tensors) give identical bits, for every method the search can run."""
    monkeypatch.setattr(M, "CHUNK", 96)
    from transformers import LlamaForCausalLM

    from dem.search.weights import InMemoryMerge

    folders = [
        extract_vector(zoo["base"], zoo[k], tmp_path / k, progress=False) for k in ("m1", "m2")
    ]
    model = LlamaForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32)
    merger = InMemoryMerge(model, {f.name: load_vector(f) for f in folders})
    for method, params in CASES:
        if method == "slerp":  # one model: the search holds two
            continue
        params = {**params, "seed": 3}
        merger.apply_method(method, W, **params)
        out = M.merge(zoo["base"], list(zip(folders, W, strict=True)), tmp_path / method,
                      method=method, progress=False, **params)  # fmt: skip
        streamed = load_file(out / "model.safetensors")
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, streamed[name]), (method, name)


def test_inputs_are_hashed_as_the_merge_reads_them(zoo, tmp_path, monkeypatch):
    """A cold merge hashes each file in pieces, in order, as its blocks are read (one read of
    each byte), not in one pass of its own; a warm one hashes nothing."""
    from dem.merging import hashing

    monkeypatch.setattr(M, "CHUNK", 96)
    pieces: dict[Path, list[tuple[int, int]]] = {}
    original = hashing.StreamHasher._hash

    def spy(self, lo, hi):
        pieces.setdefault(self.path, []).append((lo, hi))
        return original(self, lo, hi)

    monkeypatch.setattr(hashing.StreamHasher, "_hash", spy)
    models = [(zoo["m1"], 0.5), (zoo["m2"], 0.5)]
    out = M.merge(zoo["base"], models, tmp_path / "a", method="ties", progress=False)
    record = json.loads((out / "dem_merge.json").read_text())
    files = [zoo["base"] / "model.safetensors", zoo["m1"] / "model.safetensors",
             *sorted(zoo["m2"].glob("model-*.safetensors"))]  # fmt: skip
    assert set(pieces) == set(files)
    for file in files:
        ranges = pieces[file]
        assert ranges[0][0] == 0 and ranges[-1][1] == file.stat().st_size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), file
    assert len(pieces[zoo["m1"] / "model.safetensors"]) > 10  # followed the reads, block by block
    for entry in [record["base"], *record["models"]]:
        for file, digest in entry["sha256"].items():
            assert hashlib.sha256((Path(entry["path"]) / file).read_bytes()).hexdigest() == digest
    pieces.clear()
    M.merge(zoo["base"], models, tmp_path / "b", method="ties", progress=False)
    assert pieces == {}  # every digest came from the cache


def test_refusals_name_what_is_wrong_and_write_nothing(zoo, tmp_path):
    out = tmp_path / "out"
    one = [(zoo["m1"], 0.5)]
    # the output may be neither a model nor the base: merging into an input would destroy it
    for taken in (zoo["m1"], zoo["base"]):
        with pytest.raises(DemError, match=f"^output {taken} is also an input$"):
            M.merge(zoo["base"], one, taken, overwrite=True, progress=False)
    with pytest.raises(DemError, match=f"^model {zoo['m1']}: weight nan is not a finite number"):
        M.merge(zoo["base"], [(zoo["m1"], float("nan"))], out, progress=False)
    with pytest.raises(
        DemError, match="^compute dtype must be float32 or float64, not torch.float16"
    ):
        M.merge(zoo["base"], one, out, compute_dtype=torch.float16, progress=False)
    vec = extract_vector(zoo["base"], zoo["m1"], tmp_path / "v1")
    with pytest.raises(DemError, match=f"^base {vec} is a vector folder; the base must be a model"):
        M.merge(vec, one, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]
    assert load_weights(zoo["m1"]) and (zoo["base"] / "model.safetensors").exists()


def test_output_records_its_method_dtype_and_time(zoo, tmp_path):
    out = M.merge(zoo["base"], [(zoo["m1"], 0.5), (zoo["m2"], 0.5)], tmp_path / "out",
                  method="ties", progress=False)  # fmt: skip
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["dem_method"] == "ties"
    record = json.loads((out / "dem_merge.json").read_text())
    assert record["dtype"] == "as base" and record["method"] == "ties"
    assert 0 < record["wall_s"] < 600  # seconds this merge took, not a clock reading
    bf16 = M.merge(zoo["base"], [(zoo["m1"], 0.5)], tmp_path / "bf", dtype="bfloat16",
                   progress=False)  # fmt: skip
    assert json.loads((bf16 / "dem_merge.json").read_text())["dtype"] == "BF16"  # safetensors' name
