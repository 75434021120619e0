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
        metavar="NAME|FILE",
        help="a shipped parameter set by name (default, scratch, smoke, ...; see --list) or a "
        "YAML file (default: default)",
    )
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<params name>)")
    p.add_argument("--force", action="store_true", help="rerun every step, even the unchanged ones")
    p.add_argument("--seed", type=int, help="override the parameter set's seed")
    p.add_argument("--allow-mix", action="store_true",
                   help="reuse chapters (and resume fine-tunes) computed with another torch "
                   "version, device, dtype or thread count (refused by default)")  # fmt: skip
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (VALUE as YAML: --set finetune_steps=400 "
                   "--set 'search_values=[0, 1]'); `dem config` lists them")  # fmt: skip
    p.add_argument("--quiet", action="store_true",
                   help="one line per chapter: no section lines, no progress bars (CI logs)")  # fmt: skip
    which = p.add_mutually_exclusive_group()
    which.add_argument("--only", metavar="NN",
                       help="rerun one chapter (e.g. 04), reusing the finished earlier ones")  # fmt: skip
    which.add_argument("--from", dest="start", metavar="NN",
                       help="rerun this chapter and every later one, reusing the earlier ones")  # fmt: skip
    which.add_argument("--list", action="store_true",
                       help="list the chapters and the shipped parameter sets, then exit")  # fmt: skip
    p.set_defaults(func=_run)
    _add_config(sub)
    _add_seeds(sub)
    _add_publish(sub)


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="show every run setting: its value, the chapters that read it and why",
        description="Every setting of a tutorial run is declared once (dem/config.py, "
        "RunConfig), with its default: the embedded default. Without --params, list them "
        "with their why; with --params, show the values that parameter set gives, checked, "
        "and what it changes.",
    )
    p.add_argument("--params", metavar="NAME|FILE", help="a shipped parameter set or a YAML file")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, as for dem run")  # fmt: skip
    p.set_defaults(func=_config)


def _add_seeds(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "seeds",
        help="run the whole pipeline once per seed and report mean ± std",
        description="Run `dem run` once per seed into OUT/seed-N (finished steps are skipped, "
        "so an interrupted series resumes), then write OUT/summary.csv and OUT/summary.md: "
        "per method, the mean and standard deviation over seeds of each test score, the "
        "average, the composite set and the training tokens.",
    )
    p.add_argument("--params", metavar="FILE", help="YAML parameter set (as for dem run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="N",
                   help="seeds to run (default: 0 1 2)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", required=True, help="folder of the seed runs")
    p.set_defaults(func=_seeds)


def _add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "publish",
        help="write a finished run's chapters as Markdown with their figures (for docs/)",
        description="Convert the executed notebooks of a finished run folder to Markdown (nbconvert) "
        "with their figures as PNG files, plus metrics.json and an index with the run's "
        "command, commit and wall times: readable on any Git host without running anything.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a finished dem run folder")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder, e.g. docs/default")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_publish)


def _overrides(args: argparse.Namespace) -> dict:
    from dem.config_files import parse_assignment

    overrides = dict(parse_assignment(text) for text in args.settings)
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    return overrides


def _config(args: argparse.Namespace) -> int:
    import yaml

    from dem import config_files
    from dem.run import pipeline

    if not args.params and not args.settings:
        print(config_files.describe())
        return 0
    chosen = config_files.load_config(pipeline.resolve_params(args.params), _overrides(args))
    print(yaml.safe_dump({"changes": chosen.changes(), "settings": chosen.to_dict()},
                         sort_keys=False, allow_unicode=True), end="")  # fmt: skip
    return 0


def _publish(args: argparse.Namespace) -> int:
    from dem.run.publish import publish

    out = publish(args.run_dir, args.out, overwrite=args.overwrite)
    print(f"published: {out}/README.md")
    return 0


def _seeds(args: argparse.Namespace) -> int:
    from dem.run.seeds import run_seeds

    run_seeds(args.params, args.out, args.seeds)
    print(f"summary: {args.out}/summary.md")
    return 0


def _run(args: argparse.Namespace) -> int:
    from dem.run import pipeline

    if args.list:
        print("chapters:")
        for name, title in pipeline.chapters():
            print(f"  {name:<26} {title}")
        print("parameter sets (--params NAME):")
        for name, line in pipeline.parameter_sets():
            print(f"  {name:<26} {line}")
        return 0
    run_dir = pipeline.run(
        args.params, args.out, force=args.force, overrides=_overrides(args), only=args.only,
        start=args.start, quiet=args.quiet, allow_mix=args.allow_mix,
    )  # fmt: skip
    _report(run_dir, quiet=args.quiet)
    return 0


def _report(run_dir, *, quiet: bool) -> None:
    """The result table in the terminal and the chapters as Markdown in ``run_dir/report``."""
    import json

    from dem.evaluation.results import summary_text
    from dem.layout import RunLayout
    from dem.run.publish import publish

    layout = RunLayout(run_dir)
    if layout.metrics.is_file():  # absent when --only stopped before chapter 06
        print(summary_text(json.loads(layout.metrics.read_text())))
        try:
            report = publish(run_dir, layout.report, overwrite=True)
            print(f"report: {report}/README.md")
        # The run is complete: a report nbconvert cannot write (no template) must not fail it.
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            print(f"report: not written ({type(err).__name__}: {first}); retry with "
                  f"`dem publish {run_dir} --out DIR`")  # fmt: skip
    print(f"run finished: {run_dir} (open it with: jupyter lab {run_dir})")
