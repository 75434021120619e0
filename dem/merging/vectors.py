"""Distribution vectors v = θ_i − θ0: extract one from two model folders, save it, load it.

A vector folder holds ``vector.safetensors`` (sharded with an index when large) with every
floating-point tensor of the base, in float32, and ``dem_vector.json`` naming the base and the
source model with their content hashes. ``dem merge`` accepts a vector folder wherever it
accepts a fine-tuned model, and uses v directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from dem import DemError
from dem.bases import resolve_base
from dem.io import atomic_output_dir, write_json
from dem.merging.inputs import VECTOR_MARKER, open_input, parse_size
from dem.merging.safetensors_io import DTYPE_NAMES, ShardedWriter, WeightFolder
from dem.provenance import provenance


def extract_vector(
    base: str | Path,
    model: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write v = θ_model − θ_base (computed in float64, stored in ``dtype``) to a vector folder.

    Streams tensor by tensor like :func:`dem.merging.merge.merge`; integer/bool buffers are skipped
    (a merge takes them from its base).
    """
    # a base named as a chapter names it (dem:NAME, a GGUF file): the folder the fine-tunes
    # started from
    base, model, out = Path(resolve_base(base)), Path(model), Path(out)
    base_weights = WeightFolder(base, role="base")
    source = open_input(base_weights, model, 1.0)
    if source.is_vector:
        raise DemError(f"model {model} is already a vector folder")
    base_weights.start_hashing()
    source.weights.start_hashing()
    names = [n for n in base_weights.names if base_weights.tensors[n].is_float]
    specs = [(n, DTYPE_NAMES[dtype], base_weights.tensors[n].shape) for n in names]
    meta = {
        "dem_kind": "distribution_vector",
        "base": str(base.resolve()),
        "source": str(model.resolve()),
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(
            tmp, specs, prefix="vector", metadata=meta, max_shard_bytes=parse_size(max_shard_size)
        )
        for name in tqdm(
            names, desc="dem vectors extract", unit="tensor", disable=not progress, leave=False
        ):
            # float64 difference, so a float32 vector of bf16/fp32 models loses nothing needed
            v = source.tensor(name).to(torch.float64).sub_(base_weights.tensor(name))
            if not torch.isfinite(v).all():
                culprit = source if torch.isfinite(base_weights.tensor(name)).all() else None
                file = source.file(name) if culprit else base_weights.tensors[name].file
                raise DemError(f"{file}: tensor {name!r} contains NaN or Inf")
            writer.write(name, v.to(dtype))
            base_weights.release()
            source.release()
        writer.close()
        record = {
            **meta,
            "format": "dem distribution vector v = theta_source - theta_base",
            "base_sha256": base_weights.sha256(),
            "source_sha256": source.weights.sha256(),
            "dtype": str(dtype).removeprefix("torch."),
            **provenance(),
        }
        write_json(tmp / VECTOR_MARKER, record)
        base_weights.close()
        source.weights.close()
    return out


def load_vector(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a vector folder, in memory (for analysis; merging streams instead)."""
    path = Path(path)
    if not (path / VECTOR_MARKER).is_file():
        raise DemError(f"{path} is not a vector folder (no {VECTOR_MARKER})")
    folder = WeightFolder(path, prefix="vector", role="vector")
    try:
        return {name: folder.read(name) for name in folder.names}
    finally:
        folder.close()


def vector_info(path: str | Path) -> dict:
    """The metadata of a vector folder: base, source, their hashes, dtype."""
    return json.loads((Path(path) / VECTOR_MARKER).read_text())
