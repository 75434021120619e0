"""The streaming merge: any method of :mod:`dem.methods`, applied one tensor at a time from files.

Reads each input's tensor as a view of its file, hands the method the vectors v_i = θ_i − θ0
of that tensor (whole, or in chunks when the method is element-wise) and writes the result
straight into the output's safetensors files, so memory stays at a few tensors whatever the
model size. Inputs and the output's record are handled by :mod:`dem.merge_io`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from dem import DemError
from dem.io import atomic_output_dir, check_output_free, write_json
from dem.layout import MERGE_RECORD
from dem.merge_io import (
    VECTOR_MARKER,
    MergeInput,
    copy_model_files,
    dtype_name,
    merge_record,
    open_input,
    parse_size,
)
from dem.methods import Method, check_weights, get_method, resolve_params, tensor_generator
from dem.safetensors_io import DTYPES, ShardedWriter, WeightFolder, _nbytes

Tensor = torch.Tensor
CHUNK = 1 << 22  # elements per step (16 MiB in float32): large enough to amortise overheads


class _Scratch:
    """Compute buffers reused for every tensor: the streaming merge allocates, and page-faults,
    its working memory once instead of once per tensor."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.buffers = dtype, {}

    def get(self, key: str, shape: torch.Size) -> Tensor:
        n = shape.numel()
        if key not in self.buffers or self.buffers[key].numel() < n:
            self.buffers[key] = torch.empty(n, dtype=self.dtype)
        return self.buffers[key][:n].view(shape)


def merge(
    base: str | Path,
    models: list[tuple[str | Path, float]],
    out: str | Path,
    *,
    method: str = "dem",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    max_shard_size: int | str = "5GB",
    **params,
) -> Path:
    """Merge ``models`` (model or vector folders, each with a weight) into a new model at ``out``.

    ``params`` are the method's parameters (``density=0.5``, ``drop_prob=0.9``, ``lam=0.5``,
    ``seed=1``; see :data:`dem.methods.METHODS`), defaults filled in. Arithmetic is in
    ``compute_dtype``; each tensor is cast to ``dtype`` (default: the base's dtype for that
    tensor). Integer and bool tensors are copied from the base. ``out`` appears only when
    complete, with ``dem_merge.json``.
    """
    # Element-wise arithmetic here is memory-bound: a second torch thread only competes with the
    # hashing thread (measured on 2 cores: 10.5 s with one thread, 14.8 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _merge(base, models, out, method=method, dtype=dtype, overwrite=overwrite,
                      compute_dtype=compute_dtype, progress=progress,
                      max_shard_size=max_shard_size, params=params)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _merge(base, models, out, *, method, dtype, overwrite, compute_dtype, progress,
           max_shard_size, params) -> Path:  # fmt: skip
    started = time.time()
    m = get_method(method)
    check_weights([w for _, w in models], [f"model {path}" for path, _ in models])
    params = resolve_params(m, params)
    if compute_dtype not in (torch.float32, torch.float64):
        raise DemError(f"compute dtype must be float32 or float64, not {compute_dtype}")
    out, base = Path(out), Path(base)
    out_dtype = dtype_name(dtype)
    shard_bytes = parse_size(max_shard_size)
    if out.resolve() in {Path(p).resolve() for p, _ in models} | {base.resolve()}:
        raise DemError(f"output {out} is also an input")
    check_output_free(out, overwrite=overwrite)
    base_weights = WeightFolder(base, role="base")
    if (base / VECTOR_MARKER).exists():
        raise DemError(f"base {base} is a vector folder; the base must be a model folder")
    inputs = [open_input(base_weights, Path(p), float(w)) for p, w in models]
    folders = [base_weights, *(inp.weights for inp in inputs)]
    for folder in folders:
        folder.start_hashing()  # on spare cores, while the merge runs

    specs = []
    for name, info in base_weights.tensors.items():
        specs.append((name, out_dtype if info.is_float and out_dtype else info.dtype, info.shape))
    scratch = _Scratch(compute_dtype)
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            writer = ShardedWriter(tmp, specs, max_shard_bytes=shard_bytes,
                                   metadata={"dem_method": method})  # fmt: skip
            bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, leave=False,
                       desc=f"dem merge ({method})", disable=not progress)  # fmt: skip
            with bar:
                for name, out_dtype_name, shape in specs:
                    cast = DTYPES[out_dtype_name]
                    if not base_weights.tensors[name].is_float:  # e.g. position ids: copied as is
                        writer.write(name, base_weights.tensor(name))
                    elif m.elementwise:  # in chunks: the working set is a few chunks
                        n = math.prod(shape)
                        spans = ((lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK))
                        writer.write_chunks(name, (_merge_span(name, span, base_weights, inputs,
                                                               m, params, scratch, cast)
                                                   for span in spans))  # fmt: skip
                    else:
                        writer.write(name, _merge_span(name, None, base_weights, inputs, m, params,
                                                       scratch, cast))  # fmt: skip
                    for folder in folders:
                        folder.release()
                    bar.update(_nbytes(out_dtype_name, shape))
            writer.close()
            copy_model_files(base, tmp, out_dtype)
            record = merge_record(method, params, base_weights, inputs, out_dtype or "as base",
                                  compute_dtype, time.time() - started)  # fmt: skip
            write_json(tmp / MERGE_RECORD, record)
    finally:
        for folder in folders:  # also on errors: unmap files, let the hashing threads finish
            folder.close()
    return out


def _merge_span(name, span, base, inputs, m: Method, params, scratch, out_dtype) -> Tensor:
    """Merge elements ``span = (lo, hi)`` of a flattened tensor (``None``: the whole tensor),
    check the result is finite, cast it to the output dtype."""
    lo, hi = span or (0, None)
    view = base.tensor(name, lo, hi)
    theta0 = view if view.dtype == scratch.dtype else scratch.get("base", view.shape).copy_(view)
    w = [inp.weight for inp in inputs]
    xs = _operands(name, lo, hi, theta0, inputs, m, scratch)
    out = scratch.get("acc", theta0.shape) if m.one_at_a_time else None
    result = m.merge(theta0, xs, w, params, tensor_generator(m, params, name), out=out)
    if not torch.isfinite(result.sum()):
        raise _nonfinite(name, base, inputs)
    result = result.to(out_dtype)
    # every folder's views of this span can go now, except the result itself
    for folder in (base, *inputs):
        folder.release()
    return result


def _operands(name, lo, hi, theta0, inputs: list[MergeInput], m: Method, scratch) -> Iterator:
    """What the method takes for each input, in compute dtype: v_i (θ_i for a method on models).

    A file view is handed over as is where the method writes nothing and the dtype already
    fits; a method that takes one input at a time gets one scratch buffer, refilled per input.
    """
    tmp = scratch.get("tmp", theta0.shape) if m.one_at_a_time else None
    for inp in inputs:
        x = inp.tensor(name, lo, hi)  # a view of the file: read, never written
        if inp.is_vector == m.on_models:  # v_i from a model folder, or θ_i from a vector folder
            y = torch.add(theta0, x, out=tmp) if inp.is_vector else torch.sub(x, theta0, out=tmp)
        elif tmp is None:  # a tensor of its own: the method holds every input at once
            y = x.to(theta0.dtype, copy=True)
        elif x.dtype != theta0.dtype or m.overwrites:
            y = tmp.copy_(x)
        else:
            y = x
        # A method that holds every input at once (TIES) may trim a NaN away, so check each
        # input here; a sum carries it into the result, which is checked after.
        if tmp is None and not torch.isfinite(y.sum()) and not torch.isfinite(y).all():
            raise DemError(f"{inp.file(name)}: tensor {name!r} contains NaN or Inf")
        yield y


def _nonfinite(name: str, base: WeightFolder, inputs: list[MergeInput]) -> DemError:
    """Name the input file and tensor holding NaN/Inf (found only once the result shows one)."""
    for folder, tensor_name in [
        (base, name),
        *((i.weights, i.alias.get(name, name)) for i in inputs),
    ]:
        if not torch.isfinite(folder.tensor(tensor_name)).all():
            return DemError(
                f"{folder.tensors[tensor_name].file}: tensor {tensor_name!r} contains NaN or Inf"
            )
    return DemError(
        f"merged tensor {name!r} overflows: use smaller weights or a float64 compute dtype"
    )
