#!/usr/bin/env bash
# Mutation testing of the merge core ([tool.mutmut] in pyproject.toml; results in docs/mutation.md).
#
#   benchmarks/mutation.sh                  # every mutant of dem/merging/{merge,methods,vectors}.py, dem/search/weights.py
#   benchmarks/mutation.sh 'dem.merging.vectors.*'  # one module (mutmut reruns the mutants it names)
#
# mutmut copies the package into mutants/ and keeps its verdicts there, so an interrupted run
# resumes where it stopped. The table counts a timeout as killed, as mutmut's own score does.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "$@" || true
python - <<'PY'
import collections, json, pathlib
from mutmut.stats import status_by_exit_code

rows, total = [], collections.Counter()
for meta in sorted(pathlib.Path("mutants/dem").glob("*/*.py.meta")):
    codes = json.loads(meta.read_text())["exit_code_by_key"].values()
    c = collections.Counter(
        "not checked" if e is None else status_by_exit_code[e] for e in codes
    )
    total += c
    rows.append((f"{meta.parent.name}/{meta.name.removesuffix('.meta')}", c))
rows.append(("all four", total))
print(f"{'module':<20}{'killed':>8}{'timeout':>9}{'survived':>10}{'unchecked':>11}{'total':>7}{'killed %':>10}")
for name, c in rows:
    checked = sum(c.values()) - c["not checked"]
    share = 100 * (c["killed"] + c["timeout"]) / checked if checked else float("nan")
    print(f"{name:<20}{c['killed']:>8}{c['timeout']:>9}{c['survived']:>10}"
          f"{c['not checked']:>11}{sum(c.values()):>7}{share:>9.1f}%")
PY
