"""Execute one notebook headless (papermill) the way ``dem run`` needs it.

Three things papermill does not do by itself:

- **No kernel warning.** Over TCP, ipykernel warns on every start that its traffic is not
  encrypted (the kernel only listens on localhost, but the line alarms users). The kernel here
  talks over IPC sockets in a private temporary folder instead, which is also what the warning
  recommends.
- **Sections as they start.** Each time execution enters a new ``## `` section of the chapter,
  one line is logged: ``[dem run] 02_finetuning · 2. Fine-tune once per source``.
- **Progress bars in the terminal, not in the notebook.** Long work draws its bars through
  :mod:`dem.progress` into a side file, echoed here while the notebook runs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager

from dem import progress


def ipc_kernel_manager(folder: Path) -> type[AsyncKernelManager]:
    """A kernel manager class whose kernels listen on IPC sockets inside ``folder``.

    ``folder`` should be private (``tempfile`` makes folders with mode 0700) and short-lived:
    the sockets are files, removed with it.
    """

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = str(folder / "kernel")

    return IPCKernelManager


def sections(notebook: Path) -> dict[int, str]:
    """Cell index -> title of the ``## `` section that cell opens (markdown headings)."""
    cells = json.loads(notebook.read_text())["cells"]
    found = {}
    for i, cell in enumerate(cells):
        first = "".join(cell["source"]).lstrip().splitlines()[:1]
        if cell["cell_type"] == "markdown" and first and first[0].startswith("## "):
            found[i] = first[0][3:].strip()
    return found


def run_notebook(
    notebook: Path,
    executed: Path,
    parameters: dict,
    cwd: Path,
    *,
    log: Callable[[str], None] = print,
    quiet: bool = False,
) -> None:
    """Execute ``notebook`` into ``executed`` (papermill errors propagate)."""
    import papermill as pm

    titles = sections(notebook)
    step = notebook.stem

    def on_cell_start(cell, cell_index, **_) -> None:
        if cell_index in titles and not quiet:
            log(f"[dem run] {step} · {titles[cell_index]}")

    with tempfile.TemporaryDirectory(prefix="dem-progress-") as side:
        side_file = Path(side) / "progress.txt"
        before = {k: os.environ.get(k) for k in (progress.PROGRESS_FILE, progress.QUIET)}
        # The kernel inherits this process's environment when it starts.
        os.environ[progress.PROGRESS_FILE] = str(side_file)
        os.environ[progress.QUIET] = "1" if quiet else "0"
        try:
            with progress.Echo(side_file):
                pm.execute_notebook(
                    str(notebook),
                    str(executed),
                    parameters=parameters,
                    kernel_name="python3",
                    cwd=str(cwd),
                    progress_bar=False,
                    log_output=False,
                    kernel_manager_class=ipc_kernel_manager(Path(side)),
                    on_cell_start=on_cell_start,
                )
        finally:
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
