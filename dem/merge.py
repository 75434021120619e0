"""Merge methods as pure tensor functions, and the streaming driver that applies them.

Notation (DEM.md): ``theta_base`` = θ0, ``thetas`` = [θ_i], distribution vector v_i = θ_i − θ0,
``w`` = one weight per model. Every function works on one tensor; the driver :func:`merge`
applies it to every floating-point tensor of a model, one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from dem import DemError, __version__
from dem.io import atomic_output_dir, check_output_free
from dem.safetensors_io import (
    DTYPE_NAMES,
    DTYPES,
    ShardedWriter,
    WeightFolder,
    _nbytes,
)
from dem.vectors import VECTOR_MARKER

Tensor = torch.Tensor


def distribution_vectors(theta_base: Tensor, thetas: Sequence[Tensor]) -> list[Tensor]:
    """v_i = θ_i − θ0."""
    return [theta - theta_base for theta in thetas]


def weighted_sum(tensors: Sequence[Tensor], w: Sequence[float]) -> Tensor:
    """Σ_i w_i · x_i, accumulated left to right in one buffer."""
    acc = tensors[0] * w[0]
    for x, w_i in zip(tensors[1:], w[1:], strict=True):
        acc.add_(x, alpha=w_i)
    return acc


def dem(theta_base: Tensor, thetas: Sequence[Tensor], w: Sequence[float]) -> Tensor:
    """DEM (Ram et al. 2024): θ = θ0 + Σ_i w_i · (θ_i − θ0)."""
    return weighted_sum(distribution_vectors(theta_base, thetas), w).add_(theta_base)


def linear(thetas: Sequence[Tensor], w: Sequence[float]) -> Tensor:
    """Linear merge / model soup (Wortsman et al. 2022): θ = Σ_i w_i · θ_i (w_i = 1/n: uniform soup)."""
    return weighted_sum(thetas, w)


def task_arithmetic(
    theta_base: Tensor, thetas: Sequence[Tensor], lam: float, w: Sequence[float] | None = None
) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ · Σ_i w_i · v_i, with w_i = 1 by default.

    The optional per-model ``w`` is what mergekit's ``task_arithmetic`` calls ``weight``.
    """
    w = [1.0] * len(thetas) if w is None else w
    return dem(theta_base, thetas, [lam * w_i for w_i in w])


def trim(v: Tensor, density: float) -> Tensor:
    """TIES trim: keep the round(density · numel) entries of largest |v|, zero the rest."""
    k = round(density * v.numel())
    if k >= v.numel():
        return v.clone()
    out = torch.zeros_like(v)
    if k > 0:
        keep = torch.topk(v.abs().flatten(), k, sorted=False).indices
        out.view(-1)[keep] = v.view(-1)[keep]
    return out


def ties_delta(vectors: Sequence[Tensor], w: Sequence[float], density: float) -> Tensor:
    """TIES (Yadav et al. 2023) on distribution vectors, before scaling by λ.

    τ̂_i = trim(v_i, k); elected sign γ = sgn(Σ_i w_i τ̂_i) (sign of the total mass);
    disjoint mean τ = Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i over A = {i : sgn(τ̂_i) = γ}, entrywise
    (entries no model keeps stay 0). With w_i = 1 this is the paper's unweighted mean.
    """
    trimmed = torch.stack([trim(v, density) for v in vectors])
    weights = torch.tensor(w, dtype=trimmed.dtype).view(-1, *[1] * (trimmed.dim() - 1))
    weighted = trimmed * weights
    sign = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (sign != 0)
    mass = torch.where(agree, weighted, 0).sum(dim=0)
    count = torch.where(agree, weights, 0).sum(dim=0)
    return mass / torch.where(count == 0, 1, count)


def ties(
    theta_base: Tensor,
    thetas: Sequence[Tensor],
    w: Sequence[float],
    density: float,
    lam: float = 1.0,
) -> Tensor:
    """TIES merging: θ = θ0 + λ · ties_delta(v_1..v_n; w, density)."""
    vectors = distribution_vectors(theta_base, thetas)
    return theta_base + lam * ties_delta(vectors, w, density)


def dare(v: Tensor, drop_prob: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry with probability p, rescale survivors by 1/(1 − p).

    Entry j survives when u_j ≥ p for u_j ~ U[0, 1) drawn from ``generator`` (in place on v).
    """
    # drawn in float32 whatever v's dtype, so float32 and float64 merges drop the same entries
    u = torch.rand(v.shape, generator=generator)
    return v.mul_((u >= drop_prob).to(v.dtype)).div_(1 - drop_prob)


def dare_linear(
    theta_base: Tensor,
    thetas: Sequence[Tensor],
    w: Sequence[float],
    drop_prob: float,
    generator: torch.Generator,
) -> Tensor:
    """DARE + linear: θ = θ0 + Σ_i w_i · dare(v_i, p)  (masks drawn for v_1, v_2, … in order)."""
    vectors = [dare(v, drop_prob, generator) for v in distribution_vectors(theta_base, thetas)]
    return weighted_sum(vectors, w).add_(theta_base)


def dare_ties(
    theta_base: Tensor,
    thetas: Sequence[Tensor],
    w: Sequence[float],
    drop_prob: float,
    density: float,
    generator: torch.Generator,
    lam: float = 1.0,
) -> Tensor:
    """DARE + TIES: θ = θ0 + λ · ties_delta(dare(v_1, p)..dare(v_n, p); w, density).

    With density 1 (the default) nothing is trimmed by magnitude, as in mergekit's dare_ties.
    """
    vectors = [dare(v, drop_prob, generator) for v in distribution_vectors(theta_base, thetas)]
    return theta_base + lam * ties_delta(vectors, w, density)


PURE: dict[str, Callable[..., Tensor]] = {
    "dem": dem,
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}
DEFAULT_DENSITY = {"ties": 0.2, "dare_ties": 1.0}  # TIES paper keeps the top 20%
DEFAULT_DROP_PROB = 0.9  # DARE paper: p = 0.9 keeps quality for fine-tuned LLM deltas


def tensor_seed(seed: int, name: str) -> int:
    """Seed for one tensor's DARE masks: a hash of (seed, tensor name), not of the tensor's
    position, so the result does not depend on the order tensors are stored or processed in."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def merge_tensor(
    method: str,
    theta_base: Tensor,
    thetas: Sequence[Tensor],
    w: Sequence[float],
    *,
    name: str = "",
    density: float | None = None,
    drop_prob: float | None = None,
    seed: int = 0,
    lam: float = 1.0,
) -> Tensor:
    """Any method through one signature, with the same defaults, checks and DARE seeding
    (from ``seed`` and the tensor ``name``) as :func:`merge`, so an in-memory merge of a
    state dict equals the streamed one."""
    params = _check_params(method, [(f"model {i + 1}", w_i) for i, w_i in enumerate(w)],
                           density, drop_prob, lam, seed, torch.float32)  # fmt: skip
    if method == "dem":
        return dem(theta_base, thetas, w)
    if method == "linear":
        return linear(thetas, w)
    if method == "task_arithmetic":
        return task_arithmetic(theta_base, thetas, params["lam"], w)
    if method == "ties":
        return ties(theta_base, thetas, w, params["density"], params["lam"])
    generator = torch.Generator().manual_seed(tensor_seed(seed, name))
    if method == "dare_linear":
        return dare_linear(theta_base, thetas, w, params["drop_prob"], generator)
    return dare_ties(theta_base, thetas, w, params["drop_prob"], params["density"], generator,
                     params["lam"])  # fmt: skip


def _uniform(method: str) -> Callable[..., Tensor]:
    def fn(theta_base: Tensor, thetas: Sequence[Tensor], w: Sequence[float], **options) -> Tensor:
        return merge_tensor(method, theta_base, thetas, w, **options)

    fn.__name__, fn.__doc__ = method, PURE[method].__doc__
    return fn


# every method as fn(theta_base, thetas, w, *, name, density, drop_prob, seed, lam)
METHODS: dict[str, Callable[..., Tensor]] = {method: _uniform(method) for method in PURE}


# --- the streaming driver ----------------------------------------------------------------
# Methods whose result is a·θ0 + Σ c_i·x_i can accumulate one input at a time (three tensors in
# memory); TIES needs every model's vector of a tensor at once for the sign election.
STREAMING = {"dem", "linear", "task_arithmetic", "dare_linear"}
# ... and those without randomness are element-wise, so they also run in spans of a tensor
# (DARE's masks are drawn per whole tensor, to be independent of any chunk size)
ELEMENTWISE = {"dem", "linear", "task_arithmetic"}
CHUNK = 1 << 22  # elements per step (16 MiB in float32): large enough to amortise overheads
USES = {"density": {"ties", "dare_ties"}, "drop_prob": {"dare_linear", "dare_ties"}}
USES["lam"] = {"task_arithmetic", "ties", "dare_ties"}
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
    """One ``--model``: a model folder (θ_i) or a saved vector folder (v_i), with its weight."""

    path: Path
    weight: float
    weights: WeightFolder
    is_vector: bool
    alias: dict[str, str] = field(default_factory=dict)  # base name -> name in this input

    def tensor(self, name: str, lo: int = 0, hi: int | None = None) -> Tensor:
        """A read-only view of this input's tensor for the base's ``name`` (or elements lo:hi)."""
        return self.weights.tensor(self.alias.get(name, name), lo, hi)

    def release(self) -> None:
        self.weights.release()

    def file(self, name: str) -> Path:
        return self.weights.tensors[self.alias.get(name, name)].file


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
    density: float | None = None,
    drop_prob: float | None = None,
    seed: int = 0,
    lam: float = 1.0,
    overwrite: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Merge ``models`` (model or vector folders, each with a weight) into a new model at ``out``.

    Reads one tensor of each input at a time and writes the output incrementally, so memory
    is a few tensors whatever the model size. Arithmetic is in ``compute_dtype``; each tensor
    is cast to ``dtype`` (default: the base's dtype for that tensor). Integer and bool tensors
    are copied from the base. ``out`` appears only when complete, with ``dem_merge.json``.
    """
    # Element-wise arithmetic here is memory-bound: a second torch thread only competes with the
    # hashing thread (measured on 2 cores: 10.5 s with one thread, 14.8 s with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _merge(base, models, out, method=method, dtype=dtype, density=density,
                      drop_prob=drop_prob, seed=seed, lam=lam, overwrite=overwrite,
                      compute_dtype=compute_dtype, progress=progress, max_shard_size=max_shard_size)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _merge(base, models, out, *, method, dtype, density, drop_prob, seed, lam, overwrite,
           compute_dtype, progress, max_shard_size) -> Path:  # fmt: skip
    started = time.time()
    params = _check_params(method, models, density, drop_prob, lam, seed, compute_dtype)
    out, base = Path(out), Path(base)
    out_dtype = _dtype_name(dtype)
    shard_bytes = _parse_size(max_shard_size)
    if out.resolve() in {Path(p).resolve() for p, _ in models} | {base.resolve()}:
        raise DemError(f"output {out} is also an input")
    check_output_free(out, overwrite=overwrite)
    base_weights = WeightFolder(base, role="base")
    if (base / VECTOR_MARKER).exists():
        raise DemError(f"base {base} is a vector folder; the base must be a model folder")
    inputs = [_open_input(base_weights, Path(p), w) for p, w in models]
    folders = [base_weights, *(inp.weights for inp in inputs)]
    for folder in folders:
        folder.start_hashing()  # on spare cores, while the merge runs

    specs = []
    for name, info in base_weights.tensors.items():
        specs.append((name, out_dtype if info.is_float and out_dtype else info.dtype, info.shape))
    scratch = _Scratch(compute_dtype)
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            meta = {"dem_method": method}
            writer = ShardedWriter(tmp, specs, max_shard_bytes=shard_bytes, metadata=meta)
            bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, leave=False,
                       desc=f"dem merge ({method})", disable=not progress)  # fmt: skip
            with bar:
                for name, out_dtype_name, shape in specs:
                    if not base_weights.tensors[name].is_float:  # e.g. position ids: copied as is
                        writer.write(name, base_weights.tensor(name))
                    elif method in ELEMENTWISE:  # in chunks: the working set is a few chunks
                        n = math.prod(shape)
                        chunks = (_merge_span(name, (lo, min(lo + CHUNK, n)), base_weights, inputs,
                                              method, params, scratch, DTYPES[out_dtype_name])
                                  for lo in range(0, n, CHUNK))  # fmt: skip
                        writer.write_chunks(name, chunks)
                    else:
                        writer.write(name, _merge_span(name, None, base_weights, inputs, method,
                                                       params, scratch, DTYPES[out_dtype_name]))  # fmt: skip
                    for folder in folders:
                        folder.release()
                    bar.update(_nbytes(out_dtype_name, shape))
            writer.close()
            _copy_model_files(base, tmp, out_dtype)
            record = _provenance(method, params, base_weights, inputs, out_dtype or "as base",
                                 compute_dtype, time.time() - started)  # fmt: skip
            (tmp / "dem_merge.json").write_text(json.dumps(record, indent=2) + "\n")
    finally:
        for folder in folders:  # also on errors: unmap files, let the hashing threads finish
            folder.close()
    return out


def _merge_span(name, span, base, inputs, method, params, scratch, out_dtype) -> Tensor:
    """Merge elements ``span = (lo, hi)`` of a flattened tensor (``None``: the whole tensor),
    check the result is finite, cast it to the output dtype."""
    lo, hi = span or (0, None)
    view = base.tensor(name, lo, hi)
    theta0 = view if view.dtype == scratch.dtype else scratch.get("base", view.shape).copy_(view)
    w = [inp.weight for inp in inputs]
    result = _merge_tensor(name, theta0, inputs, w, method, params, scratch, span)
    if not torch.isfinite(result.sum()):
        raise _nonfinite(name, base, inputs)
    result = result.to(out_dtype)
    # every folder's views of this span can go now, except the result itself
    for folder in (base, *inputs):
        folder.release()
    return result


def _merge_tensor(
    name: str,
    theta0: Tensor,
    inputs: list[MergeInput],
    w: list[float],
    method: str,
    params: dict,
    scratch: _Scratch,
    span: tuple[int, int] | None = None,
) -> Tensor:
    """One tensor (or span of one) of the merge: the same arithmetic, in the same order, as the
    pure functions."""
    lo, hi = span or (0, None)
    generator = None
    if method.startswith("dare"):
        generator = torch.Generator().manual_seed(tensor_seed(params["seed"], name))
    if method not in STREAMING:  # ties, dare_ties: every vector of this tensor at once
        vectors = []
        for inp in inputs:
            x = inp.tensor(name, lo, hi)
            v = x.to(theta0.dtype, copy=True) if inp.is_vector else torch.sub(x, theta0)
            if not torch.isfinite(v.sum()) and not torch.isfinite(v).all():
                raise DemError(f"{inp.file(name)}: tensor {name!r} contains NaN or Inf")
            vectors.append(v if generator is None else dare(v, params["drop_prob"], generator))
        return theta0 + params["lam"] * ties_delta(vectors, w, params["density"])
    coef = [params["lam"] * w_i for w_i in w] if method == "task_arithmetic" else w
    # linear is Σ w_i θ_i: a vector input adds w_i·v_i and w_i·θ0; the others add θ0 once
    base_coef = 1.0
    if method == "linear":
        base_coef = sum(c for inp, c in zip(inputs, coef, strict=True) if inp.is_vector)
    acc, tmp = scratch.get("acc", theta0.shape), scratch.get("tmp", theta0.shape)
    for i, (inp, c) in enumerate(zip(inputs, coef, strict=True)):
        x = inp.tensor(name, lo, hi)  # a view of the file: read, never written
        if not (inp.is_vector or method == "linear"):
            y = torch.sub(x, theta0, out=tmp)  # v_i = θ_i − θ0, fused with the read
        elif x.dtype != theta0.dtype or generator is not None:
            y = tmp.copy_(x)
        else:
            y = x
        if generator is not None:
            dare(y, params["drop_prob"], generator)
        if i == 0:
            torch.mul(y, c, out=acc)
        else:
            acc.add_(y, alpha=c)
    if base_coef == 1.0:
        acc.add_(theta0)
    elif base_coef:
        acc.add_(theta0, alpha=base_coef)
    return acc


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
        f"merged tensor {name!r} overflows: use smaller weights or --compute-dtype float64"
    )


def _check_params(method, models, density, drop_prob, lam, seed, compute_dtype) -> dict:
    if method not in METHODS:
        raise DemError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not models:
        raise DemError("no models given: pass at least one --model PATH=WEIGHT")
    for path, weight in models:
        check_weight(weight, f"model {path}")
    given = {"density": density, "drop_prob": drop_prob, "lam": None if lam == 1.0 else lam}
    flag = {"density": "--density", "drop_prob": "--drop-prob", "lam": "--lambda"}
    for key, value in given.items():
        if value is not None and method not in USES[key]:
            raise DemError(
                f"{flag[key]} does not apply to method {method!r} (only to {', '.join(sorted(USES[key]))})"
            )
    params: dict = {}
    if method in USES["lam"]:
        params["lam"] = check_weight(lam, "--lambda")
    if method in USES["density"]:
        params["density"] = DEFAULT_DENSITY[method] if density is None else density
        if not 0 < params["density"] <= 1:
            raise DemError(f"--density {params['density']} must be in (0, 1]")
    if method in USES["drop_prob"]:
        params["drop_prob"] = DEFAULT_DROP_PROB if drop_prob is None else drop_prob
        if not 0 <= params["drop_prob"] < 1:
            raise DemError(f"--drop-prob {params['drop_prob']} must be in [0, 1)")
        params["seed"] = int(seed)
    if compute_dtype not in (torch.float32, torch.float64):
        raise DemError(f"compute dtype must be float32 or float64, not {compute_dtype}")
    return params


def _open_input(base: WeightFolder, path: Path, weight: float) -> MergeInput:
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


def _copy_model_files(base: Path, out: Path, out_dtype: str | None) -> None:
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
        config.write_text(json.dumps(data, indent=2) + "\n")


def _provenance(method, params, base, inputs, out_dtype, compute_dtype, wall_s) -> dict:
    def entry(folder: WeightFolder) -> dict:
        return {"path": str(folder.folder.resolve()), "sha256": folder.sha256()}

    return {
        "dem_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "weights": [inp.weight for inp in inputs],
        "parameters": params,
        "dtype": out_dtype,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "base": entry(base),
        "models": [{**entry(inp.weights), "weight": inp.weight, **_kind(inp)} for inp in inputs],
        "hashes": "sha256 of each safetensors weight file, as sha256sum prints it "
        "(cached by path, inode, size and mtime)",
        "torch_version": torch.__version__,
        "wall_s": round(wall_s, 3),
    }


def _kind(inp: MergeInput) -> dict:
    if not inp.is_vector:
        return {"kind": "model"}
    info = json.loads((inp.path / VECTOR_MARKER).read_text())  # the vector's own provenance
    keys = ("base", "source", "base_sha256", "source_sha256")
    return {"kind": "vector", "vector_of": {k: info.get(k) for k in keys}}


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
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
        raise DemError(f"--dtype {dtype!r}: expected float32, float16, bfloat16 or float64")
    return DTYPE_NAMES[getattr(torch, name)]


def _parse_size(size: int | str) -> int:
    """5GB, 500MB, 2GiB or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10,
             "MIB": 2**20, "GIB": 2**30}  # fmt: skip
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not match or float(match[1]) <= 0:
        raise DemError(f"shard size {size!r}: expected e.g. 5GB, 500MB or a byte count")
    return int(float(match[1]) * units[match[2]])


def check_weight(value: float, what: str) -> float:
    """A merge weight must be a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DemError(f"{what}: weight {value!r} is not a finite number")
    return float(value)
