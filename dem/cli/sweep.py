"""``dem sweep``: the tutorial over a grid of bases, budgets, fine-tuning kinds and seeds."""

from __future__ import annotations

import argparse


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run the tutorial over bases x budgets x fine-tuning kinds x seeds (chapter 07)",
        description="Run chapters 01-06 once per cell of a sweep file into OUT/cells/<cell>/ "
        "(each an ordinary dem run folder), then write OUT/results.csv (one row per cell and "
        "method), OUT/diagnostics.csv (the vectors of each cell) and execute chapter 07 on them. "
        "Finished cells are skipped on a rerun, so an interrupted sweep resumes.",
    )
    p.add_argument(
        "--params",
        metavar="NAME|FILE",
        default="sweep",
        help="a shipped sweep by name (sweep, sweep-smoke: notebooks/params/NAME.yaml) or a YAML "
        "file (default: sweep)",
    )
    p.add_argument("--out", metavar="DIR", default="runs/sweep",
                   help="sweep folder (default: runs/sweep)")  # fmt: skip
    p.add_argument("--plan", action="store_true",
                   help="print every cell with its estimated time, then exit without running")  # fmt: skip
    p.add_argument("--only-cells", nargs="+", default=[], metavar="PATTERN",
                   help="run only the cells whose id matches a pattern, e.g. 'h64-*' '*-s0'")  # fmt: skip
    p.add_argument("--refresh", action="store_true",
                   help="pass finished cells through dem run too: it reruns only the chapters "
                   "whose notebook or settings changed (new methods after a code change)")  # fmt: skip
    p.add_argument("--allow-mix", action="store_true",
                   help="resume a cell begun with another torch version, device, dtype or thread "
                   "count (refused otherwise: its numbers would mix two machines)")  # fmt: skip
    p.add_argument("--no-chapter", action="store_true",
                   help="write the tables but do not execute chapter 07 at the end")  # fmt: skip
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from dem.run.sweep import run_sweep

    run_sweep(args.params, args.out, plan_only=args.plan, only_cells=args.only_cells,
              chapter=not args.no_chapter, refresh=args.refresh,
              allow_mix=args.allow_mix)  # fmt: skip
    if not args.plan:
        print(f"sweep tables: {args.out}/results.csv, {args.out}/diagnostics.csv")
    return 0
