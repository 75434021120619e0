"""Provenance: what produced a result -- software versions, git commit, hardware, command, time.

One record, written by training (``dem_train.json``), merging and ``dem run``
(``manifest.json``), so every output says which code on which machine made it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from dem import __version__

REPO = Path(__file__).resolve().parent.parent
# Distributions whose versions can change a result; absent ones are recorded as None.
PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "safetensors",
    "tokenizers",
    "peft",
    "papermill",
    "pandas",
    "seaborn",
)


def software_versions() -> dict[str, str | None]:
    """Versions of Python, dem and the libraries in :data:`PACKAGES` (None: not installed)."""
    versions: dict[str, str | None] = {"dem": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def git_state(repo: Path = REPO) -> dict[str, str | bool | None]:
    """The commit the code ran from and whether the work tree had uncommitted changes.

    Both None outside a git checkout (an installed package): git is then not asked at all, so
    a checkout that merely contains the environment is never mistaken for dem's own.
    """
    if not (repo / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        commit = _git(repo, "rev-parse", "HEAD") or None
        dirty = _git(repo, "status", "--porcelain") != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def hardware() -> dict:
    """Platform, CPU count and GPU names (thread counts are recorded by whoever sets them)."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch
    except ImportError:
        return info
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def provenance(command: list[str] | str | None = None) -> dict:
    """The provenance record: versions, ``git`` {commit, dirty}, hardware, command, UTC time.

    ``command`` defaults to this process's ``sys.argv``.
    """
    if command is None:
        command = list(sys.argv)
    elif not isinstance(command, str):
        command = [str(part) for part in command]
    return {
        "versions": software_versions(),
        "git": git_state(),
        "hardware": hardware(),
        "command": command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# What can change a result's last bits between two machines running the same code: a run that
# resumes on another one silently mixes two computations (dem/training/runs.py, dem/run/pipeline.py).
MACHINE_KEYS = ("torch", "device", "dtype", "threads")
ALLOW_MIX_ENV = "DEM_ALLOW_MIX"  # "1": dem run --allow-mix, seen by the chapters' kernels


def machine(device: str, dtype: str, threads: int) -> dict:
    """The record a resume is compared against: torch version, device type, dtype, threads."""
    import torch

    return {"torch": torch.__version__, "device": device, "dtype": dtype, "threads": threads}


def check_same_machine(recorded: dict | None, current: dict, what: str, allow_mix: bool) -> None:
    """Refuse to resume ``what`` on a machine other than the one it started on.

    A record from before machines were recorded (None) is accepted: there is nothing to compare.
    """
    if not recorded or allow_mix or os.environ.get(ALLOW_MIX_ENV) == "1":
        return
    differ = [f"{k} {recorded.get(k)} (now {current.get(k)})" for k in MACHINE_KEYS
              if recorded.get(k) != current.get(k)]  # fmt: skip
    if differ:
        from dem import DemError

        raise DemError(
            f"{what} was started with {', '.join(differ)}: resuming would mix two machines in one "
            "result; pass --allow-mix to resume anyway, or start it over"
        )
