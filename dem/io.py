"""Writing to disk atomically: the one home of "temporary name, then rename".

Every file or folder dem writes goes through here, so a reader (another chapter, a resumed run,
a user's shell) sees either the old content or the complete new one, never a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dem import DemError


def _tmp_name(path: Path) -> Path:
    # Hidden, and unique per process and call, so two writers never share a temporary file.
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds.

    For writers that want a file name (``savefig``, ``to_csv``, ``save_file``). The temporary
    path keeps ``path``'s suffix, so libraries that pick a format by extension still do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; return ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_json(path: str | Path, data: Any, *, sort_keys: bool = False) -> Path:
    """Write ``data`` as indented JSON atomically (values JSON cannot hold are written as str)."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys, default=str) + "\n")


def _terminate(signum, frame):  # noqa: ARG001
    # SIGTERM would otherwise end the process without running `finally` blocks, leaving the
    # temporary folder behind; SystemExit unwinds through them.
    raise SystemExit(128 + signum)


@contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; rename it to ``out`` only when the block succeeds.

    On any exception (including SIGTERM and Ctrl-C) the temporary folder is removed and ``out``
    is untouched. With ``overwrite`` an existing ``out`` is replaced only after the new one is
    complete. A SIGKILL cannot be caught: it leaves a folder named ``.<out>.dem-tmp-<pid>-…``,
    never ``out`` itself; the next run with the same ``out`` removes such leftovers whose
    process is gone.
    """
    out = Path(out)
    check_output_free(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.dem-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    in_main = _is_main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        yield tmp
        check_output_free(out, overwrite=overwrite)  # someone may have created it meanwhile
        if out.exists():
            old = out.parent / f".{out.name}.dem-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_free(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise DemError(f"output {out} already exists (pass overwrite=True to replace it)")
    if out.exists() and not out.is_dir():
        raise DemError(f"output {out} exists and is not a folder")


def refuse_foreign_folder(out: Path, ours: Callable[[str], bool], what: str) -> None:
    """Refuse an output folder that holds files a command did not write (someone's work).

    ``ours(name)`` says whether an entry of ``out`` is one the command writes; hidden
    entries (this module's temporary names) are not judged.
    """
    if out.exists() and not out.is_dir():
        raise DemError(f"output {out} exists and is not a folder")
    if not out.is_dir():
        return
    foreign = sorted(
        p.name for p in out.iterdir() if not p.name.startswith(".") and not ours(p.name)
    )
    if foreign:
        raise DemError(
            f"output folder {out} exists and is not {what} (it holds {foreign[0]!r}); "
            "choose another --out"
        )


def _remove_stale_tmp(out: Path) -> None:
    for leftover in out.parent.glob(f".{out.name}.dem-tmp-*"):
        pid = leftover.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
