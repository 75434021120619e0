"""The streaming merge: any method of :mod:`dem.merging.methods`, applied one tensor at a time from files.

Reads each tensor in blocks of whole rows (views of the files), hands the method the vectors
v_i = θ_i − θ0 of each block and writes the result straight into the output's safetensors
files, so memory stays at a few blocks per model whatever the model size. A method that needs
a whole-tensor statistic (TIES's magnitude threshold, Model Stock's cosine) gets a first pass
over the blocks. Every byte read is hashed on the way (:mod:`dem.merging.hashing`), so a merge reads
each input once. Inputs and the output's record are handled by :mod:`dem.merging.inputs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from dem import DemError
from dem.bases import resolve_base
from dem.io import atomic_output_dir, check_output_free, write_json
from dem.layout import MERGE_RECORD
from dem.merging.inputs import (
    VECTOR_MARKER,
    MergeInput,
    copy_model_files,
    dtype_name,
    merge_record,
    open_input,
    parse_size,
)
from dem.merging.methods import Method, check_weights, get_method, resolve_params, tensor_generator
from dem.merging.safetensors_io import DTYPES, ShardedWriter, WeightFolder, _nbytes
from dem.merging.steps import TensorState
from dem.model_card import write_card

Tensor = torch.Tensor
CHUNK = 1 << 20  # elements per block (4 MiB in float32): large enough to amortise overheads


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
    ``seed=1``; see :data:`dem.merging.methods.METHODS`), defaults filled in. Arithmetic is in
    ``compute_dtype``; each tensor is cast to ``dtype`` (default: the base's dtype for that
    tensor). Integer and bool tensors are copied from the base. ``out`` appears only when
    complete, with ``dem_merge.json`` and a model card (``README.md``) stating the recipe.
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
    m.check_models(len(models))
    params = resolve_params(m, params)
    if compute_dtype not in (torch.float32, torch.float64):
        raise DemError(f"compute dtype must be float32 or float64, not {compute_dtype}")
    # a base named as a chapter names it (dem:NAME, a GGUF file): the folder the fine-tunes
    # started from, converted once
    out, base = Path(out), Path(resolve_base(base))
    out_dtype = dtype_name(dtype)
    shard_bytes = parse_size(max_shard_size)
    if out.resolve() in {Path(p).resolve() for p, _ in models} | {base.resolve()}:
        raise DemError(f"output {out} is also an input")
    check_output_free(out, overwrite=overwrite)
    if (base / VECTOR_MARKER).exists():  # before the lookup, which would only say "no weights"
        raise DemError(f"base {base} is a vector folder; the base must be a model folder")
    base_weights = WeightFolder(base, role="base")
    inputs: list[MergeInput] = []
    folders = [base_weights]
    try:
        for p, w in models:
            inputs.append(open_input(base_weights, Path(p), float(w)))
            folders.append(inputs[-1].weights)
        for folder in folders:
            folder.start_hashing()  # every byte the merge reads is hashed as it goes by
        specs = []
        for name, info in base_weights.tensors.items():
            specs.append((name, out_dtype if info.is_float and out_dtype else info.dtype,
                          info.shape))  # fmt: skip
        streamer = _Streamer(base_weights, inputs, m, params, _Scratch(compute_dtype))
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            writer = ShardedWriter(tmp, specs, max_shard_bytes=shard_bytes,
                                   metadata={"dem_method": method})  # fmt: skip
            bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, leave=False,
                       desc=f"dem merge ({method})", disable=not progress)  # fmt: skip
            with bar:
                for name, out_dtype_name, shape in specs:
                    if not base_weights.tensors[name].is_float:  # e.g. position ids: copied as is
                        writer.write(name, base_weights.tensor(name))
                    else:
                        writer.write_chunks(name, streamer.tensor(name, DTYPES[out_dtype_name]))
                    for folder in folders:
                        folder.release()
                    bar.update(_nbytes(out_dtype_name, shape))
            writer.close()
            copy_model_files(base, tmp, out_dtype)
            record = merge_record(method, params, base_weights, inputs, out_dtype or "as base",
                                  compute_dtype, time.time() - started)  # fmt: skip
            write_json(tmp / MERGE_RECORD, record)
            write_card(tmp)  # README.md with the recipe, from the record just written
    finally:
        for folder in folders:  # also on errors: unmap files, stop hashing
            folder.close()
    return out


class _Streamer:
    """Merges one tensor at a time in blocks of whole rows, running the method's statistics
    pass first when it has one; every pass reads the blocks again (from the page cache)."""

    def __init__(self, base: WeightFolder, inputs: list[MergeInput], m: Method, params, scratch):
        self.base, self.inputs, self.m, self.params, self.scratch = base, inputs, m, params, scratch
        self.w = [inp.weight for inp in inputs]

    def tensor(self, name: str, out_dtype: torch.dtype) -> Iterator[Tensor]:
        shape = self.base.tensors[name].shape
        numel = math.prod(shape)
        rows = shape[0] if len(shape) >= 2 else 1
        cols = numel // rows if rows else 0
        step = max(1, CHUNK // max(cols, 1))
        blocks = [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]
        m = self.m
        state = TensorState(numel, len(self.inputs), tensor_generator(m, self.params, name),
                            out=None)  # fmt: skip
        if m.stats is not None:

            def passes():
                state.new_pass()
                for r0, r1 in blocks:
                    yield self._read(name, r0, r1, cols, shared=False)
                    self._release()

            state.stats = m.stats(passes, self.w, self.params, state)
        state.new_pass()
        for r0, r1 in blocks:
            theta0, xs = self._read(name, r0, r1, cols, shared=m.one_at_a_time)
            state.out = self.scratch.get("acc", theta0.shape) if m.one_at_a_time else None
            result = m.fn(theta0, xs, self.w, self.params, state)
            # the sum is one cheap reduction; only when it is not finite is every entry looked at
            # (a finite result can still sum past the dtype's range)
            if not torch.isfinite(result.sum()) and not torch.isfinite(result).all():
                raise _nonfinite(name, self.base, self.inputs)
            yield result.to(out_dtype)  # written before the next block reuses the scratch
            self._release()

    def _read(self, name, r0, r1, cols, *, shared: bool):
        """θ0 and the operands of rows r0:r1, in compute dtype.

        ``shared``: the method takes one operand at a time, so all share one scratch buffer
        (handed out lazily); otherwise each has its own, checked for NaN/Inf, because a method
        that masks entries could otherwise hide one.
        """
        view = self.base.tensor(name, r0 * cols, r1 * cols).view(r1 - r0, cols)
        dtype = self.scratch.dtype
        theta0 = view if view.dtype == dtype else self.scratch.get("base", view.shape).copy_(view)
        on_models = self.m.on_models
        if shared:
            tmp = self.scratch.get("tmp", theta0.shape)
            ops = (
                i.operand(name, r0, r1, theta0, on_models=on_models, out=tmp) for i in self.inputs
            )
            return theta0, ops
        ops = []
        for k, inp in enumerate(self.inputs):
            x = inp.operand(name, r0, r1, theta0, on_models=on_models,
                            out=self.scratch.get(f"x{k}", theta0.shape))  # fmt: skip
            if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
                raise DemError(f"{inp.file(name)}: tensor {name!r} contains NaN or Inf")
            ops.append(x)
        return theta0, ops

    def _release(self) -> None:
        # every folder's views of this block can go now (the result is a copy or scratch)
        for folder in (self.base, *self.inputs):
            folder.release()


def _nonfinite(name: str, base: WeightFolder, inputs: list[MergeInput]) -> DemError:
    """Name the input file and tensor holding NaN/Inf (found only once the result shows one)."""
    suspects = [(base, name)]
    for inp in inputs:
        pair = inp.adapter.pairs.get(name) if inp.adapter else None
        names = (pair.a, pair.b) if pair else () if inp.adapter else (inp.alias.get(name, name),)
        suspects += [(inp.weights, n) for n in names]
    for folder, tensor_name in suspects:
        if not torch.isfinite(folder.tensor(tensor_name)).all():
            return DemError(
                f"{folder.tensors[tensor_name].file}: tensor {tensor_name!r} contains NaN or Inf"
            )
    return DemError(
        f"merged tensor {name!r} overflows: use smaller weights or a float64 compute dtype"
    )
