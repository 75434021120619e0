"""``dem run``: execute the tutorial notebooks into a run folder."""

from __future__ import annotations

import argparse


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="execute the tutorial notebooks in order (papermill) into a run folder",
        description="Execute notebooks/NN_*.ipynb in order with papermill. The run folder gets "
        "the executed notebooks, figures/, models/, vectors/, tables/, metrics.json and "
        "manifest.json. Rerunning into the same folder skips finished steps whose notebook "
        "and parameters did not change.",
    )
    p.add_argument(
        "--params",
        metavar="FILE",
        help="YAML parameter set (default: notebooks/params/default.yaml; also smoke.yaml, "
        "gpu.yaml, smollm2.yaml)",
    )
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<params name>)")
    p.add_argument("--force", action="store_true", help="rerun every step, even the unchanged ones")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from dem import pipeline

    run_dir = pipeline.run(args.params, args.out, force=args.force)
    print(f"run finished: {run_dir} (open it with: jupyter lab {run_dir})")
    return 0
