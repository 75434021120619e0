"""Progress bars for long work, shown where the person waiting can see them.

Interactively (a terminal, JupyterLab) a bar is an ordinary ``tqdm.auto`` bar. Under ``dem run``
the notebooks execute in a headless kernel whose output is saved into the executed notebook,
where a bar's hundreds of redraws would be clutter. So ``dem run`` names a side file in
``DEM_PROGRESS_FILE``: bars write there, not to the kernel's output, and ``dem run`` echoes the
file to its own terminal while the notebook runs (:class:`Echo`). ``DEM_QUIET=1`` (``dem run
--quiet``, for CI logs) turns every bar off.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROGRESS_FILE = "DEM_PROGRESS_FILE"
QUIET = "DEM_QUIET"


def quiet() -> bool:
    return os.environ.get(QUIET, "") not in ("", "0")


def bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar (``kwargs`` as tqdm's): to the ``dem run`` side file, or the usual place."""
    side = os.environ.get(PROGRESS_FILE)
    if side:
        from tqdm import tqdm

        # A plain (not notebook-widget) bar with a fixed width: the side file is a text stream.
        stream = open(side, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed by bar)
        progress = tqdm(iterable, file=stream, disable=not enabled or quiet(), ncols=100,
                        mininterval=1.0, **kwargs)  # fmt: skip
        progress.close = _closing(progress.close, stream)
        return progress
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled or quiet(), **kwargs)


def _closing(close, stream):
    def both() -> None:
        close()
        if not stream.closed:
            stream.write("\n")
            stream.close()

    return both


class Echo:
    """Copy what the kernel writes to the side file onto ``out`` while a notebook runs.

    A thread polls the file (a FIFO would block the kernel when nobody reads it); what it reads
    goes to ``out`` unchanged, carriage returns included, so a bar redraws in place on a
    terminal and shows its last state in a log.
    """

    def __init__(self, path: Path, out: Any = None, interval: float = 0.5):
        self.path, self.out, self.interval = Path(path), out or sys.stderr, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._position = 0

    def __enter__(self) -> Echo:
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._copy()

    def _copy(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self._position)
            text = f.read()
            self._position = f.tell()
        if text:
            self.out.write(text)
            self.out.flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._copy()
            time.sleep(self.interval)
