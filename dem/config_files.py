"""Where the declaration of run settings (:class:`dem.config.RunConfig`) meets files: the
parameter files it reads, ``dem run --set``, the chapters' papermill ``parameters`` cells it
writes, and the text ``dem config`` shows.

``python -m dem.config_files`` rewrites every chapter's cell from the declaration (``--check``:
only list the stale ones).
"""

from __future__ import annotations

import json
import sys
import typing
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from dem import DemError
from dem.config import ALL, RESERVED, RunConfig, make_config, setting_types


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The settings a parameter file gives (each key a change to the defaults), then
    ``overrides`` (``dem run --set``, ``--seed``), validated before anything runs."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise DemError(f"parameter file {path}: cannot be read ({err.strerror})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise DemError(f"parameter file {path}: not valid YAML ({first})") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise DemError(
            f"parameter file {path}: expected a mapping of setting: value, "
            f"got {type(values).__name__}"
        )
    reserved = [k for k in RESERVED if k in values]
    if reserved:
        raise DemError(f"parameter file {path}: {reserved[0]} is set by dem run itself (use --out)")
    config = make_config(values, where=f"parameter file {path}")
    if not overrides:
        return config
    return make_config({**config.changes(), **overrides}, where="--set")


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``dem run --set`` (VALUE read as YAML: ``[0, 1]``, ``2.0e-4``, ``''``)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise DemError(f"--set {text!r}: expected KEY=VALUE")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError:
        raise DemError(f"--set {text!r}: the value is not valid YAML") from None


def _literal(value: Any) -> str:
    """A Python literal as ruff would format it (double quotes)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _cell_type(kind: Any) -> str:
    """The annotation papermill reads: the plain builtin (``list`` for ``list[str]``)."""
    return (typing.get_origin(kind) or kind).__name__


def parameters_cell(chapter: str) -> str:
    """The source of chapter ``chapter``'s papermill parameters cell."""
    default, types = RunConfig(), setting_types()
    lines = []
    for f in fields(RunConfig):
        if chapter in f.metadata["chapters"]:
            value = _literal(getattr(default, f.name))
            lines.append(f"{f.name}: {_cell_type(types[f.name])} = {value}  # {f.metadata['help']}")
    return "\n".join(lines)


def sync_notebooks(folder: Path, *, check: bool = False) -> list[Path]:
    """Write each chapter's parameters cell from the declaration; the notebooks changed (or,
    with ``check``, that would change)."""
    import nbformat

    changed = []
    for path in sorted(folder.glob("[0-9][0-9]_*.ipynb")):
        chapter = path.name[:2]
        if chapter not in ALL:
            continue
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        wanted = parameters_cell(chapter)
        if cell.source != wanted:
            changed.append(path)
            if not check:
                cell.source = wanted
                nbformat.write(nb, path)
    return changed


def describe() -> str:
    """Every setting with its default, the chapters that read it and its why (``dem config``)."""
    default, rows = RunConfig(), []
    for f in fields(RunConfig):
        rows.append(
            f"{f.name} = {_literal(getattr(default, f.name))}\n"
            f"    {f.metadata['help']} [chapters {', '.join(f.metadata['chapters'])}]"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    from dem import resources

    stale = sync_notebooks(resources.NOTEBOOKS, check="--check" in sys.argv)
    for path in stale:
        print(f"{'stale' if '--check' in sys.argv else 'written'}: {path}")
    raise SystemExit(1 if stale and "--check" in sys.argv else 0)
