"""``dem pretrain`` and ``dem finetune``: options and the calls into training.

The training options are generated from the settings dataclasses
(:mod:`dem.training.settings`): one ``--flag`` per field, its help and default from the field.
Options left unset are not passed, so the library defaults apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

from dem import DemError
from dem.cli.sources import _source_spec
from dem.training.schedule import parse_mixture
from dem.training.settings import FinetuneSettings, PretrainSettings, Settings

# gradient_checkpointing (True / False / None = choose for the device) on the command line.
_TRISTATE = {"auto": None, "on": True, "off": False}
_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_help(text: str, names: list[str]) -> str:
    # Settings' help names other settings by parameter (eval_every); here they are flags.
    with_underscore = [n for n in names if "_" in n]
    if not with_underscore:
        return text
    pattern = r"\b(" + "|".join(map(re.escape, with_underscore)) + r")\b"
    return re.sub(pattern, lambda m: _flag(m.group(1)), text)


def _default_text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_settings(parser: argparse.ArgumentParser, cls: type[Settings]) -> None:
    """One option per field of ``cls``: type, help and default shown from the field."""
    hints = typing.get_type_hints(cls)
    names = cls.names()
    for f in dataclasses.fields(cls):
        text = _cli_help(f.metadata["help"], names)
        hint = hints[f.name]
        if hint == bool | None:
            parser.add_argument(
                _flag(f.name), choices=tuple(_TRISTATE), help=f"{text} (default auto)"
            )
            continue
        kind = next(t for t in (int, float, str) if hint in (t, t | None))
        if f.default is not None:
            text += f" (default {_default_text(f.default)})"
        parser.add_argument(_flag(f.name), type=kind, metavar=_METAVARS[kind], help=text)


def _settings_kwargs(args: argparse.Namespace, cls: type[Settings]) -> dict:
    """The settings the user set (library defaults apply to the rest)."""
    kwargs = {n: getattr(args, n) for n in cls.names() if getattr(args, n) is not None}
    if isinstance(kwargs.get("gradient_checkpointing"), str):
        kwargs["gradient_checkpointing"] = _TRISTATE[kwargs["gradient_checkpointing"]]
    return kwargs


def _add_training(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="build the tiny base: a small Llama pretrained on generic text (cached)",
        description="Pretrain the tiny default base on generated generic text that shares the "
        "sources' characters but none of their formats. The result is an ordinary model folder "
        "(plus train_log.csv, cost.json, dem_train.json); rerunning with the same parameters "
        "reuses it, an interrupted run resumes from its last checkpoint.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    _add_settings(p, PretrainSettings)
    _add_common_training(p)
    p.set_defaults(func=_pretrain)

    f = sub.add_parser(
        "finetune",
        help="fine-tune a base on one source or a mixture of sources (DMix)",
        description="Full (or, with --lora-r, LoRA) fine-tuning on one source (--source) or "
        "on a mixture (--mixture a=0.5,b=0.5: each example's source drawn by the ratios). "
        "Writes an ordinary model folder plus train_log.csv, cost.json and dem_train.json, "
        "and prints the cost record. An interrupted run resumes from its last checkpoint when "
        "rerun with the same arguments. Several GPUs: accelerate launch -m dem finetune ... "
        "(or torchrun).",
    )
    f.add_argument("--base", required=True, metavar="DIR", help="base model folder or hub id")
    what = f.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--source", metavar="NAME", help="one source: a name, or a JSON object for your own data"
    )
    what.add_argument("--mixture", metavar="A=R,B=R", help="sources and their mixture ratios")
    f.add_argument(
        "--custom-source",
        action="append",
        default=[],
        metavar="JSON",
        help="JSON object (with a 'name') for a mixture entry that is your own data; repeatable",
    )
    f.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    _add_settings(f, FinetuneSettings)
    f.add_argument("--n-train", type=int, help="training examples per source")
    f.add_argument("--n-validation", type=int, help="validation examples per source")
    _add_common_training(f)
    f.set_defaults(func=_finetune)


def _add_common_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 on <= 2 cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--allow-mix", action="store_true",
                   help="resume a checkpoint written with another torch version, device, dtype "
                   "or thread count (refused by default: the result would mix two machines)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_kwargs(args: argparse.Namespace) -> dict:
    return {
        "overwrite": args.overwrite,
        "allow_mix": args.allow_mix,
        "progress": not args.no_progress,
    }


def _pretrain(args: argparse.Namespace) -> int:
    import os

    from dem.models import set_cpu_threads
    from dem.training.pretrain import pretrain

    set_cpu_threads(args.threads)
    out = pretrain(args.out, **_settings_kwargs(args, PretrainSettings), **_run_kwargs(args))
    if os.environ.get("RANK", "0") == "0":
        print(f"base model: {out}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import json
    import os

    custom: dict[str, dict] = {}
    for text in args.custom_source:
        spec = _source_spec(text)
        if not isinstance(spec, dict) or not spec.get("name"):
            raise DemError(f"--custom-source {text!r} must be a JSON object with a 'name'")
        custom[spec["name"]] = spec
    if args.source is not None:
        spec = _source_spec(args.source)
        if isinstance(spec, dict):
            if not spec.get("name"):
                raise DemError("--source JSON object needs a 'name'")
            custom[spec["name"]] = spec
            spec = spec["name"]
        mixture = {spec: 1.0}
    else:
        mixture = parse_mixture(args.mixture)
    given = {"seed": args.seed, "n_train": args.n_train, "n_validation": args.n_validation}
    source_kwargs = {k: v for k, v in given.items() if v is not None}
    from dem.models import set_cpu_threads
    from dem.training.finetune import finetune

    set_cpu_threads(args.threads)
    cost = finetune(
        args.base,
        args.out,
        mixture=mixture,
        source_kwargs=source_kwargs,
        custom_sources=custom or None,
        **_settings_kwargs(args, FinetuneSettings),
        **_run_kwargs(args),
    )
    if os.environ.get("RANK", "0") == "0":  # one report under accelerate launch / torchrun
        print(json.dumps(cost, indent=2, sort_keys=True))
    return 0
