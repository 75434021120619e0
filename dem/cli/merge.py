"""``dem merge`` and ``dem vectors``: options and the calls into :mod:`dem.merging.merge`."""

from __future__ import annotations

import argparse
import textwrap

from dem import DemError
from dem.merging.methods import METHODS, PARAMS, Param, ParameterError

DEFAULT_METHOD = "dem"


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned models (or distribution vectors) into one model",
        description="Merge fine-tuned models, saved distribution vectors or LoRA adapters with a\n"
        "base model. Streams in blocks of rows (memory: a few blocks per model), reads and hashes\n"
        "each input once, computes in float32, and writes an ordinary Hugging Face model folder\n"
        "with dem_merge.json (method, weights, parameters, input hashes).",
        epilog=_MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--base",
        metavar="BASE",
        help="base model folder theta_0 (config, tokenizer "
        "and the tensor list of the output come from it)",
    )
    p.add_argument(
        "--model",
        metavar="PATH=WEIGHT",
        action="append",
        dest="models",
        help="a fine-tuned model folder, a vector folder (from `dem vectors "
        "extract`) or a peft LoRA adapter folder, and its weight w_i; repeat for each model",
    )
    p.add_argument("--out", metavar="OUT", help="output model folder (created when complete)")
    p.add_argument(
        "--method", choices=list(METHODS), help=f"merge method (default: {DEFAULT_METHOD})"
    )
    p.add_argument(
        "--dtype",
        metavar="D",
        help="output dtype of floating-point tensors: "
        "float32, bfloat16, float16 (default: each tensor's dtype in the base)",
    )
    p.add_argument(
        "--compute-dtype",
        choices=["float32", "float64"],
        help="arithmetic precision (default: float32)",
    )
    for param in PARAMS.values():  # each method's parameters, as its record declares them
        p.add_argument(_flag(param), dest=param.name, type=param.kind, metavar=param.metavar,
                       help=_param_help(param))  # fmt: skip
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="split output weights into "
        "safetensors shards of at most SIZE, e.g. 5GB, 500MB (default: 5GB)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="replace OUT if it "
        "exists (the old folder is removed only after the new one is complete)",
    )
    p.add_argument("--config", metavar="merge.yaml", help="read the settings from a YAML file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_merge)
    _add_vectors(sub)


def _add_vectors(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "vectors",
        help="distribution vectors v = theta_model - theta_base",
        description="Work with distribution vectors v = theta_model - theta_base.",
    )
    vsub = v.add_subparsers(dest="vectors_command", metavar="ACTION", required=True)
    e = vsub.add_parser(
        "extract",
        help="save v = MODEL - BASE to a vector folder",
        description="Save the distribution vector v = theta_MODEL - theta_BASE "
        "(float32 safetensors, with dem_vector.json naming base and model and "
        "their hashes). `dem merge --model VECTOR_FOLDER=W` uses it directly.",
    )
    e.add_argument("--base", required=True, help="base model folder theta_0")
    e.add_argument("--model", required=True, help="fine-tuned model folder theta_i")
    e.add_argument("--out", required=True, help="output vector folder (created when complete)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_run_vectors_extract)


def _flag(param: Param) -> str:
    return "--" + param.config_key.replace("_", "-")


def _param_help(param: Param) -> str:
    """The record's line, its valid values, and which methods take it with which default."""
    users: dict = {}
    for m in METHODS.values():
        for own in m.params:
            if own.name == param.name:
                users.setdefault(own.default, []).append(m.name)
    valid = f", {param.valid_text}" if param.valid_text else ""
    defaults = "; ".join(f"{d} for {', '.join(names)}" for d, names in users.items())
    return f"{param.doc}{valid} (default: {defaults})"


_SETTINGS = ("base", "models", "out", "method", "dtype", "compute_dtype")
_MERGE_KEYS = {*_SETTINGS, *(p.config_key for p in PARAMS.values()), "overwrite", "max_shard_size"}
_METHOD_ROWS = "\n".join(
    f"  {m.name:<16} {m.formula:<40}{' *' if m.stats else ''} ({m.about})" for m in METHODS.values()
)
_MERGE_EPILOG = f"""\
methods (θ0 = base, v_i = θ_i − θ0, w_i = the model's weight; * = a statistics pass over each
tensor first; each method's exact conventions are in docs/reference.md and dem/merging/methods.py):
{_METHOD_ROWS}

{
    textwrap.fill(
        f"--config merge.yaml takes the same settings as keys ({', '.join(sorted(_MERGE_KEYS))}); "
        'models is a list of "PATH=WEIGHT" strings or {path: P, weight: W} mappings. Flags '
        "given on the command line override the file; --model flags replace its model list. "
        "Paths are relative to the current folder. Example:",
        96,
    )
}

  dem merge --base runs/base --model runs/math=0.6 --model runs/code=0.4 --out runs/dem
"""


def _merge_settings(args: argparse.Namespace) -> dict:
    """Settings from --config, overridden by the flags given on the command line."""
    settings: dict = {}
    if args.config:
        import yaml

        try:
            with open(args.config) as f:
                settings = yaml.safe_load(f) or {}
        except OSError as err:
            raise DemError(f"--config {args.config}: cannot read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise DemError(
                f"--config {args.config}: not valid YAML ({err.__class__.__name__})"
            ) from None
        if not isinstance(settings, dict):
            raise DemError(f"--config {args.config}: expected a mapping of settings")
        unknown = sorted(set(settings) - _MERGE_KEYS)
        if unknown:
            raise DemError(
                f"--config {args.config}: unknown key {unknown[0]!r} "
                f"(known: {', '.join(sorted(_MERGE_KEYS))})"
            )
    flags = {key: getattr(args, key) for key in (*_SETTINGS, "overwrite", "max_shard_size")}
    flags.update({p.config_key: getattr(args, p.name) for p in PARAMS.values()})
    settings.update({k: v for k, v in flags.items() if v is not None})
    for key in ("base", "out"):
        if not settings.get(key):
            raise DemError(f"missing --{key} (or `{key}:` in --config)")
    settings["models"] = [_model_spec(m) for m in settings.get("models") or []]
    return settings


def _model_spec(spec) -> tuple[str, float]:
    """'PATH=WEIGHT' or {path: P, weight: W} -> (PATH, WEIGHT), refusing weights that are not finite numbers."""
    import math

    if isinstance(spec, dict) and set(spec) == {"path", "weight"}:
        path, weight = str(spec["path"]), spec["weight"]
    elif isinstance(spec, str) and "=" in spec:
        path, weight = spec.rsplit("=", 1)
    else:
        raise DemError(f"--model {spec!r}: expected PATH=WEIGHT, e.g. runs/math=0.5")
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(weight, bool) or not math.isfinite(value) or not path:
        raise DemError(f"--model {spec!r}: weight {weight!r} is not a finite number")
    return path, value


def _run_merge(args: argparse.Namespace) -> int:
    s = _merge_settings(args)
    if s.get("compute_dtype", "float32") not in ("float32", "float64"):
        raise DemError(f"compute_dtype {s['compute_dtype']!r}: expected float32 or float64")
    import torch

    from dem.merging.merge import merge

    params = {p.name: s[p.config_key] for p in PARAMS.values() if p.config_key in s}
    try:
        out = merge(
            s["base"],
            s["models"],
            s["out"],
            method=s.get("method", DEFAULT_METHOD),
            dtype=s.get("dtype"),
            overwrite=bool(s.get("overwrite", False)),
            compute_dtype=getattr(torch, s.get("compute_dtype", "float32")),
            progress=not args.no_progress,
            max_shard_size=s.get("max_shard_size", "5GB"),
            **params,
        )
    except ParameterError as err:  # the library names the parameter; here it is a flag
        raise DemError(f"{_flag(PARAMS[err.parameter])} {err.problem}") from None
    except OSError as err:  # e.g. no permission or no space for the output: one line, no traceback
        raise DemError(f"{err.filename or s['out']}: {err.strerror or err}") from None
    print(out)
    return 0


def _run_vectors_extract(args: argparse.Namespace) -> int:
    from dem.merging.vectors import extract_vector

    print(
        extract_vector(
            args.base, args.model, args.out, overwrite=args.overwrite, progress=not args.no_progress
        )
    )
    return 0
