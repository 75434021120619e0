"""Compare two run folders number by number: metrics.json and every tables/*.csv|json.

Used to show a refactor changed no result (issue 10): wall-clock columns and keys (``*_s``,
``*wall*``, ``time``, ``started``, ``merge_overhead``) are skipped, everything else must be equal exactly.

    python benchmarks/compare_runs.py runs/before runs/after
"""

import json
import sys
from pathlib import Path

import pandas as pd

TIMING = {"time", "started", "merge_overhead"}


def _is_timing(key: str) -> bool:
    key = str(key)
    return key in TIMING or key.endswith("_s") or "wall" in key


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not _is_timing(k)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    files = sorted(
        {p.relative_to(before) for p in before.glob("tables/*")} | {Path("metrics.json")}
    )
    for rel in files:
        a, b = before / rel, after / rel
        if not b.exists():
            problems.append(f"{rel}: missing in {after}")
            continue
        if rel.suffix == ".csv":
            x, y = pd.read_csv(a), pd.read_csv(b)
            keep = [c for c in x.columns if not _is_timing(c)]
            if list(x.columns) != list(y.columns):
                problems.append(f"{rel}: columns differ")
            elif not x[keep].equals(y[keep]):
                problems.append(f"{rel}: values differ")
        elif rel.suffix == ".json":
            if _strip(json.loads(a.read_text())) != _strip(json.loads(b.read_text())):
                problems.append(f"{rel}: values differ")
    print(f"compared {len(files)} files")
    return problems


if __name__ == "__main__":
    found = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(found) if found else "identical (timing fields skipped)")
    sys.exit(1 if found else 0)
