"""What surrounds a merge's arithmetic: its inputs, checked against the base, and its record.

An input is a model folder (θ_i), a vector folder (v_i, written by ``dem vectors extract``) or a
peft LoRA adapter folder (v_i = s·B·A, :mod:`dem.merging.adapters`); every tensor of the base must be
there with the same shape, allowing for tied embeddings. :meth:`MergeInput.operand` hands the
merge rows of v_i (or θ_i) whatever the kind. The
output takes its config and tokenizer from the base, and ``dem_merge.json`` records the method,
weights, parameters, the inputs' content hashes and the shared provenance record.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dem import DemError
from dem.io import write_json
from dem.merging.adapters import LoraAdapter, is_adapter
from dem.merging.safetensors_io import DTYPE_NAMES, DTYPES, WeightFolder
from dem.provenance import provenance

VECTOR_MARKER = "dem_vector.json"  # a folder holding it is a distribution vector
# A model saved with tied embeddings stores only the embedding; its output layer is the same tensor.
TIED = {"lm_head.weight": "model.embed_tokens.weight"}
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
COPIED_GLOBS = ("tokenizer*", "vocab*")


@dataclass
class MergeInput:
    """One input of a merge: a model (θ_i), a saved vector (v_i) or a LoRA adapter, and its weight."""

    path: Path
    weight: float
    weights: WeightFolder
    is_vector: bool  # holds v_i (a vector folder or an adapter), not θ_i
    alias: dict[str, str] = field(default_factory=dict)  # base name -> name in this input
    adapter: LoraAdapter | None = None

    @property
    def kind(self) -> str:
        return "adapter" if self.adapter else "vector" if self.is_vector else "model"

    def tensor(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """A read-only view of this input's tensor for the base's ``name`` (or elements lo:hi)."""
        return self.weights.tensor(self.alias.get(name, name), lo, hi)

    def operand(self, name: str, r0: int, r1: int, theta0: torch.Tensor, *, on_models: bool,
                out: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Rows r0:r1 of v_i (θ_i when ``on_models``) for base tensor ``name``, shaped and typed
        as ``theta0`` (those rows of θ0). Written into ``out`` where a computation is needed;
        otherwise a view of the file, which must not be written to."""
        if self.adapter is not None:
            v = self.adapter.vector_rows(name, r0, r1, theta0)
            return v.add_(theta0) if on_models else v
        cols = theta0.shape[1]
        x = self.tensor(name, r0 * cols, r1 * cols).view(theta0.shape)
        if self.is_vector and on_models:  # θ_i = θ0 + v_i
            return torch.add(theta0, x, out=out)
        if not self.is_vector and not on_models:  # v_i = θ_i − θ0
            return torch.sub(x, theta0, out=out)
        if x.dtype == theta0.dtype:
            return x
        return x.to(theta0.dtype) if out is None else out.copy_(x)

    def release(self) -> None:
        self.weights.release()

    def file(self, name: str) -> Path:
        if self.adapter is not None:
            return self.weights.files[0]
        return self.weights.tensors[self.alias.get(name, name)].file


def open_input(base: WeightFolder, path: Path, weight: float) -> MergeInput:
    """Open a model, vector or adapter folder; check it has every tensor of ``base``, shape for
    shape (an adapter: that each matrix it adapts is one of the base's)."""
    if is_adapter(path):
        adapter = LoraAdapter(path, base)
        return MergeInput(path, weight, adapter.weights, True, adapter=adapter)
    is_vector = (path / VECTOR_MARKER).is_file()
    weights = WeightFolder(path, prefix="vector" if is_vector else "model", role="model")
    inp = MergeInput(path, weight, weights, is_vector)
    # a vector folder holds only the floating-point tensors; buffers come from the base
    expected = [n for n in base.names if base.tensors[n].is_float] if is_vector else base.names
    tied = _config(path).get("tie_word_embeddings", False)
    for name in expected:
        have = weights.tensors.get(name)
        if have is None and name in TIED and tied and TIED[name] in weights.tensors:
            inp.alias[name] = TIED[name]
            have = weights.tensors[TIED[name]]
        if have is None:
            raise DemError(f"model {path} has no tensor {name!r} that base {base.folder} has")
        if have.shape != base.tensors[name].shape:
            raise DemError(
                f"tensor {name!r} has shape {list(have.shape)} in model {path} "
                f"but {list(base.tensors[name].shape)} in base {base.folder}"
            )
    for name in set(weights.names) - set(expected) - set(inp.alias.values()):
        if name in TIED and TIED[name] in weights.tensors and name not in base.tensors:
            # the base ties its output layer to the embeddings; this model stores it separately,
            # which is harmless only when the two are the same tensor
            if torch.equal(weights.read(name), weights.read(TIED[name])):
                continue
            raise DemError(
                f"model {path} has its own {name!r} but base {base.folder} ties it to "
                f"{TIED[name]!r}; the two differ, so merging would lose it"
            )
        raise DemError(f"model {path} has tensor {name!r} that base {base.folder} lacks")
    return inp


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def copy_model_files(base: Path, out: Path, out_dtype: str | None) -> None:
    """Config, generation config and tokenizer files come from the base, unchanged."""
    files = [base / n for n in COPIED_FILES] + [p for g in COPIED_GLOBS for p in base.glob(g)]
    for file in files:
        if file.is_file():
            shutil.copy2(file, out / file.name)
    config = out / "config.json"
    if out_dtype and config.is_file():
        data = json.loads(config.read_text())
        key = "torch_dtype" if "torch_dtype" in data else "dtype"
        data[key] = str(DTYPES[out_dtype]).removeprefix("torch.")
        write_json(config, data)


def merge_record(method, params, base, inputs, out_dtype, compute_dtype, wall_s) -> dict:
    """What ``dem_merge.json`` holds: the merge, its inputs' hashes, and the provenance."""

    def entry(folder: WeightFolder) -> dict:
        return {"path": str(folder.folder.resolve()), "sha256": folder.sha256()}

    return {
        "method": method,
        "weights": [inp.weight for inp in inputs],
        "parameters": params,
        "dtype": out_dtype,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "base": entry(base),
        "models": [{**entry(inp.weights), "weight": inp.weight, **_kind(inp)} for inp in inputs],
        "hashes": "sha256 of each safetensors weight file, as sha256sum prints it "
        "(cached by path, inode, size and mtime)",
        "wall_s": round(wall_s, 3),
        **provenance(),
    }


def _kind(inp: MergeInput) -> dict:
    if inp.adapter is not None:
        return {"kind": "adapter", "adapter": inp.adapter.record()}
    if not inp.is_vector:
        return {"kind": "model"}
    info = json.loads((inp.path / VECTOR_MARKER).read_text())  # the vector's own provenance
    keys = ("base", "source", "base_sha256", "source_sha256")
    return {"kind": "vector", "vector_of": {k: info.get(k) for k in keys}}


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """'bf16', 'bfloat16', torch.bfloat16 -> 'BF16' (safetensors' name); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype is None else DTYPE_NAMES[dtype]
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "bf16": "bfloat16",
        "half": "float16",
        "float": "float32",
        "fp64": "float64",
        "double": "float64",
    }
    name = aliases.get(dtype.lower(), dtype.lower())
    if name not in {"float32", "float16", "bfloat16", "float64"}:
        raise DemError(f"dtype {dtype!r}: expected float32, float16, bfloat16 or float64")
    return DTYPE_NAMES[getattr(torch, name)]


def parse_size(size: int | str) -> int:
    """5GB, 500MB, 2GiB or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30}  # fmt: skip
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not match or float(match[1]) <= 0:
        raise DemError(f"shard size {size!r}: expected e.g. 5GB, 500MB or a byte count")
    return int(float(match[1]) * units[match[2]])
