"""Content hashes of weight files: the plain SHA-256 (what ``sha256sum`` prints, and what the
Hugging Face Hub shows for LFS files), computed while the file is read for another purpose.

A merge reads every input once. :class:`StreamHasher` rides on that read: each time the reader
has pulled a span of the file in, the hasher is told how far the file has been read and hashes
up to there on a background thread, from the page cache the read just filled. So a cold merge
reads every byte from disk once, and the hashing costs CPU on a spare core, not a second read.
Bytes the reader never touches (a header, a tensor the merge skips) are hashed at the end.

Digests are cached by the file's identity and state (path, inode, size, modification time in
ns), the way git's index trusts unchanged stat data: a weight search merges the same inputs
many times, and only the first merge pays for hashing them.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dem import cache_dir
from dem.io import write_text

STEP = 16 << 20  # bytes hashed per step: the pages of one step are dropped before the next
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; harmless elsewhere


def madvise(mm: mmap.mmap, option: int, start: int, length: int) -> None:
    # advice only: a platform without madvise (Windows) or this option merely uses more memory
    with contextlib.suppress(AttributeError, OSError, ValueError):
        mm.madvise(option, start, length)


def _cache_file(path: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return cache_dir() / "sha256" / hashlib.sha256(key.encode()).hexdigest()[:32]


def cached_sha256(path: Path) -> str | None:
    """The cached digest of ``path`` as it is now, or None."""
    with contextlib.suppress(OSError):
        if re.fullmatch(r"[0-9a-f]{64}", cached := _cache_file(path).read_text().strip()):
            return cached
    return None


def _remember(path: Path, digest: str) -> None:
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        write_text(_cache_file(path), digest + "\n")


def file_sha256(path: Path) -> str:
    """SHA-256 of a whole file, from the cache when the file is unchanged."""
    if (cached := cached_sha256(path)) is not None:
        return cached
    hasher = StreamHasher(path, background=False)
    return hasher.result()


_POOL: list[ThreadPoolExecutor] = []


def _hash_pool() -> ThreadPoolExecutor:
    # One thread: hashlib releases the GIL, so hashing runs on a second core while the merge
    # runs on the first; the files' pieces are hashed in the order they were read.
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="dem-sha256"))
    return _POOL[0]


class StreamHasher:
    """The SHA-256 of one file, fed in file order as a reader reads the file.

    :meth:`advance` says the reader has read the file up to byte ``end`` (pages now in the page
    cache); the bytes from where hashing stands up to ``end`` are hashed on the background
    thread (or at once, without ``background``). :meth:`result` hashes whatever is left and
    returns the hex digest, caching it.
    """

    def __init__(self, path: Path, *, background: bool = True) -> None:
        self.path, self.background = path, background
        self.size = path.stat().st_size
        self._sha = hashlib.sha256()
        self._queued = 0  # bytes handed to the hashing thread so far
        self._last: Future | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._file = open(path, "rb")  # noqa: SIM115 (closed by result() or cancel())
        self._map = (
            mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        )

    def advance(self, end: int) -> None:
        """The file has been read up to byte ``end``: hash up to there."""
        end = min(end, self.size)
        with self._lock:
            if end <= self._queued:
                return
            lo, self._queued = self._queued, end
            if self.background:
                self._last = _hash_pool().submit(self._hash, lo, end)
        if not self.background:
            self._hash(lo, end)

    def _hash(self, lo: int, hi: int) -> None:
        # straight from the memory map, one step at a time, dropping each step's pages from this
        # process afterwards: no copy out of the page cache, and resident memory stays flat
        with memoryview(self._map) as data:
            for start in range(lo, hi, STEP):
                if self._cancel.is_set():
                    return
                end = min(start + STEP, hi)
                page = start - start % mmap.PAGESIZE  # madvise takes whole pages only
                madvise(self._map, MADV_POPULATE_READ, page, end - page)
                self._sha.update(data[start:end])
                # the last partial page stays mapped: the next piece reads it again
                keep = end - end % mmap.PAGESIZE if end < self.size else end
                madvise(self._map, mmap.MADV_DONTNEED, page, keep - page)

    def result(self) -> str:
        """The hex digest of the whole file (hashing what was not read yet), cached."""
        self.advance(self.size)
        if self._last is not None:
            self._last.result()  # the pool runs one task at a time, in order
        self._close()
        digest = self._sha.hexdigest()
        if not self._cancel.is_set():
            _remember(self.path, digest)
        return digest

    def cancel(self) -> None:
        """Stop hashing (the read failed): pending pieces are skipped."""
        self._cancel.set()
        if self._last is not None:
            self._last.result()
        self._close()

    def _close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
        self._file.close()
