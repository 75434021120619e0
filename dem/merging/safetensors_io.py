"""Streaming safetensors I/O: read a weight folder tensor by tensor, write one incrementally.

Why not ``safetensors.torch``: ``save_file`` needs every tensor in memory at once, and
``safe_open`` keeps whole files mapped, so every page a merge touches (all of them) stays in the
process's resident memory until the handle closes. The format is simple (8-byte little-endian
header length, a JSON header of ``{name: {dtype, shape, data_offsets}}`` plus ``__metadata__``,
then the raw bytes), so we read views of the mapped file span by span and drop each span's pages
from our address space as soon as it is merged (:meth:`WeightFolder.release`), and we write the
output's header up front (it only needs names, dtypes and shapes), then stream the bytes.

Content hashes (:mod:`dem.merging.hashing`) ride on these reads: with :meth:`WeightFolder.start_hashing`,
every span read is also hashed, in file order, on a background thread, so the files are read
once for both; each read also asks the kernel for the bytes that follow, so the disk works
while the merge computes.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from dem import DemError
from dem.merging.hashing import MADV_POPULATE_READ, StreamHasher, cached_sha256, madvise

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
READAHEAD = 32 << 20  # bytes requested ahead of each read: two 16 MiB blocks
HEADER_LIMIT = 100 << 20  # the safetensors reference implementation refuses larger headers


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; return it and the absolute offset where the data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise DemError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > HEADER_LIMIT:
                raise DemError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as err:
        raise DemError(f"{path}: cannot read ({err.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DemError(f"{path}: not a safetensors file (header is not JSON)") from None
    return header, 8 + n


class WeightFolder:
    """The safetensors weights of a model folder (or vector folder), read tensor by tensor.

    ``prefix`` is the weight file stem: ``model`` finds ``model.safetensors`` or the sharded
    ``model.safetensors.index.json``; vector folders use ``vector``.

    :meth:`tensor` returns a zero-copy view of the file (a private memory map), so reading costs
    no copy; :meth:`release` then drops those pages from this process (they stay in the page
    cache), which keeps resident memory at the few spans in use rather than the whole model.
    :meth:`start_hashing` makes every read also feed the files' SHA-256 (:mod:`dem.merging.hashing`).
    """

    def __init__(self, folder: str | Path, prefix: str = "model", role: str = "model") -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            what = "does not exist" if not self.folder.exists() else "is not a folder"
            raise DemError(f"{role} folder {self.folder} {what}")
        if not os.access(self.folder, os.R_OK | os.X_OK):
            raise DemError(f"{role} folder {self.folder} is not readable")
        self.files = self._weight_files(prefix, role)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._hashers: dict[Path, StreamHasher] = {}
        self._digests: dict[Path, str] = {}
        for file in self.files:
            try:
                self._index(file)
            except (AttributeError, KeyError, TypeError, ValueError):
                raise DemError(f"{file}: not a safetensors file (malformed header)") from None
        self._maps: dict[Path, mmap.mmap] = {}
        self._pending: list[tuple[mmap.mmap, int, int]] = []

    def _index(self, file: Path) -> None:
        header, data_start = read_header(file)
        self.metadata.update(header.pop("__metadata__", None) or {})
        size = file.stat().st_size
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if meta["dtype"] not in DTYPES:
                raise DemError(f"{file}: tensor {name!r} has unsupported dtype {meta['dtype']}")
            begin, end = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
            if end - begin != _nbytes(meta["dtype"], shape) or data_start + end > size:
                raise DemError(f"{file}: tensor {name!r} does not fit its byte range (truncated?)")
            self.tensors[name] = TensorInfo(
                file, meta["dtype"], shape, data_start + begin, data_start + end
            )

    def _weight_files(self, prefix: str, role: str) -> list[Path]:
        index = self.folder / f"{prefix}.safetensors.index.json"
        single = self.folder / f"{prefix}.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError):
                raise DemError(f"{index}: not a safetensors index (no weight_map)") from None
            files = [self.folder / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise DemError(f"{index} lists {file.name}, which does not exist")
            return files
        if single.is_file():
            return [single]
        other = sorted(p.name for p in self.folder.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        hint = f" (found {', '.join(other)}: convert to safetensors first)" if other else ""
        raise DemError(
            f"{role} folder {self.folder} has no weights: expected {single.name} or {index.name}{hint}"
        )

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def tensor(self, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """A view of one tensor in the file, or of its flattened elements ``[lo, hi)``.

        Do not modify it; call :meth:`release` when done with everything taken so far.
        """
        info = self.tensors[name]
        dtype = DTYPES[info.dtype]
        whole = hi is None
        hi = math.prod(info.shape) if whole else hi
        start, end = info.start + lo * dtype.itemsize, info.start + hi * dtype.itemsize
        if end <= start:
            return torch.empty(info.shape if whole else (0,), dtype=dtype)
        mm = self._map(info.file)
        page = start - start % mmap.PAGESIZE
        madvise(mm, MADV_POPULATE_READ, page, end - page)  # fault the pages in with one call
        # and ask for what follows in the background: a cold read of the next span overlaps
        # the computation on this one (readers go through a file mostly in order)
        ahead = min(READAHEAD, len(mm) - end)
        if ahead > 0:
            madvise(mm, mmap.MADV_WILLNEED, end - end % mmap.PAGESIZE, ahead)
        if (hasher := self._hashers.get(info.file)) is not None:
            hasher.advance(end)  # these bytes are in the page cache now: hash them too
        view = memoryview(mm)[start:end]
        self._pending.append((mm, page, end))
        flat = torch.frombuffer(view, dtype=dtype)
        return flat.reshape(info.shape) if whole else flat

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                # ACCESS_COPY (MAP_PRIVATE): writable for torch.frombuffer, never written back
                mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return mm

    def read(self, name: str) -> torch.Tensor:
        """A copy of one tensor that the caller owns."""
        out = self.tensor(name).clone()
        self.release()
        return out

    def release(self) -> None:
        """Done with every view taken so far: drop their pages from this process's memory
        (they stay in the page cache, so a later read is still cheap)."""
        for mm, page, end in self._pending:
            madvise(mm, mmap.MADV_DONTNEED, page, end - page)
        self._pending.clear()

    def start_hashing(self) -> None:
        """From now on, hash every weight file as it is read (files with a cached digest are
        not hashed again); :meth:`sha256` then hashes what was not read and returns the digests."""
        for file in self.files:
            if file in self._digests or file in self._hashers:
                continue
            if (cached := cached_sha256(file)) is not None:
                self._digests[file] = cached
            else:
                self._hashers[file] = StreamHasher(file)

    def sha256(self) -> dict[str, str]:
        """``{file name: sha256}`` of every weight file."""
        self.start_hashing()
        for file, hasher in list(self._hashers.items()):
            self._digests[file] = hasher.result()
            del self._hashers[file]
        return {file.name: self._digests[file] for file in self.files}

    def close(self) -> None:
        for hasher in self._hashers.values():  # after sha256() there are none; after an error
            hasher.cancel()  # the partial hashes are dropped
        self._hashers.clear()
        self.release()
        for mm in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still alive keeps it mapped until freed
                mm.close()
        self._maps.clear()


class ShardedWriter:
    """Write tensors, in a fixed order known up front, into one or more safetensors files.

    ``specs`` is ``[(name, dtype name, shape), ...]``; shards are planned from the sizes so
    each header can be written before any data exists. More than one shard gets an index
    ``{prefix}.safetensors.index.json`` the way ``transformers`` writes it.
    """

    def __init__(
        self,
        folder: Path,
        specs: list[tuple[str, str, tuple[int, ...]]],
        *,
        prefix: str = "model",
        max_shard_bytes: int = 5 * 10**9,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder, self.metadata = folder, {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, str, tuple[int, ...], int]]] = [[]]
        size = 0
        for name, dtype, shape in specs:
            nbytes = _nbytes(dtype, shape)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, shape, nbytes))
            size += nbytes
        n = len(shards)
        self.file_names = (
            [f"{prefix}.safetensors"]
            if n == 1
            else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.plan = [
            (name, dtype, shape, i) for i, s in enumerate(shards) for name, dtype, shape, _ in s
        ]
        self._shards = shards
        self.total_bytes = sum(nb for s in shards for *_, nb in s)
        self._next = 0
        self._file = None
        self._shard = -1
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self.file_names[i] for name, _, _, i in self.plan},
            }
            (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def _open_shard(self, i: int) -> None:
        if self._file:
            self._file.close()
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape, nbytes in self._shards[i]:
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself does
        self._file = open(self.folder / self.file_names[i], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._shard = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan (must come in plan order, with its dtype and shape)."""
        want, dtype, shape, _ = self.plan[self._next]
        if tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"writer expected {want} with shape {shape}, got {tuple(tensor.shape)}"
            )
        self.write_chunks(name, [tensor.reshape(-1)])

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Append the next tensor of the plan from consecutive flat pieces of it."""
        want, dtype, shape, shard = self.plan[self._next]
        if name != want:
            raise RuntimeError(f"writer expected tensor {want}, got {name}")
        if shard != self._shard:
            self._open_shard(shard)
        written = 0
        for chunk in chunks:
            if DTYPE_NAMES[chunk.dtype] != dtype:
                raise RuntimeError(f"writer expected {want} as {dtype}, got {chunk.dtype}")
            t = chunk.contiguous()
            if t.numel():
                # memoryview of the tensor's own storage: no extra copy on the way to the file
                written += self._file.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
        if written != _nbytes(dtype, shape):
            raise RuntimeError(
                f"writer got {written} bytes for {want}, expected {_nbytes(dtype, shape)}"
            )
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.plan):
            raise RuntimeError(f"writer closed after {self._next} of {len(self.plan)} tensors")
        if self._file:
            self._file.close()
            self._file = None


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * DTYPES[dtype].itemsize
