"""``dem merge`` and ``dem vectors``: options and the calls into :mod:`dem.merge`."""

from __future__ import annotations

import argparse

from dem import DemError


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned models (or distribution vectors) into one model",
        description="Merge fine-tuned models, or saved distribution vectors, with a base model.\n"
        "Streams tensor by tensor (memory: a few tensors), computes in float32, and writes an\n"
        "ordinary Hugging Face model folder with dem_merge.json (method, weights, input hashes).",
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
        help="a fine-tuned model folder or a vector folder (from `dem vectors "
        "extract`) and its weight w_i; repeat for each model",
    )
    p.add_argument("--out", metavar="OUT", help="output model folder (created when complete)")
    p.add_argument(
        "--method",
        choices=["dem", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"],
        help="merge method (default: dem)",
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
    p.add_argument(
        "--density",
        type=float,
        metavar="K",
        help="TIES: fraction of each vector's "
        "largest-magnitude entries kept, in (0, 1] (default: 0.2 for ties, 1.0 for dare_ties)",
    )
    p.add_argument(
        "--drop-prob",
        type=float,
        metavar="P",
        help="DARE: probability of dropping "
        "each entry, in [0, 1); survivors are scaled by 1/(1-P) (default: 0.9)",
    )
    p.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        metavar="L",
        help="scale of the merged vector for task_arithmetic, ties, dare_ties (default: 1.0)",
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="DARE seed; masks depend on the seed and the tensor name only (default: 0)",
    )
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


_MERGE_EPILOG = """\
methods (theta_0 = base, v_i = theta_i - theta_0, w_i = the model's weight):
  dem              theta_0 + sum_i w_i v_i                       (default; DEM, Ram et al. 2024)
  linear           sum_i w_i theta_i                             (model soup: w_i = 1/n)
  task_arithmetic  theta_0 + lambda sum_i w_i v_i                (Ilharco et al. 2023)
  ties             theta_0 + lambda TIES(v; w, density)          (Yadav et al. 2023)
  dare_linear      theta_0 + sum_i w_i DARE(v_i; p)              (Yu et al. 2024)
  dare_ties        theta_0 + lambda TIES(DARE(v; p); w, density)

--config merge.yaml takes the same settings as keys (base, models, out, method, dtype,
compute_dtype, density, drop_prob, lambda, seed, overwrite, max_shard_size); models is a list
of "PATH=WEIGHT" strings or {path: P, weight: W} mappings. Flags given on the command line
override the file; --model flags replace its model list. Paths are relative to the current
folder. Example:

  dem merge --base runs/base --model runs/math=0.6 --model runs/code=0.4 --out runs/dem
"""


_MERGE_KEYS = {
    "base",
    "models",
    "out",
    "method",
    "dtype",
    "compute_dtype",
    "density",
    "drop_prob",
    "lambda",
    "seed",
    "overwrite",
    "max_shard_size",
}


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
    flags = {
        "base": args.base,
        "models": args.models,
        "out": args.out,
        "method": args.method,
        "dtype": args.dtype,
        "compute_dtype": args.compute_dtype,
        "density": args.density,
        "drop_prob": args.drop_prob,
        "lambda": args.lam,
        "seed": args.seed,
        "overwrite": args.overwrite,
        "max_shard_size": args.max_shard_size,
    }
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
    numbers = {"seed": int, "density": float, "drop_prob": float, "lambda": float}
    for key, kind in numbers.items():
        if key in s and (isinstance(s[key], bool) or not isinstance(s[key], int | float)):
            raise DemError(f"{key} {s[key]!r} is not a number")
        if key in s:
            s[key] = kind(s[key])
    if s.get("compute_dtype", "float32") not in ("float32", "float64"):
        raise DemError(f"compute_dtype {s['compute_dtype']!r}: expected float32 or float64")
    import torch

    from dem.merge import merge

    try:
        out = merge(
            s["base"],
            s["models"],
            s["out"],
            method=s.get("method", "dem"),
            dtype=s.get("dtype"),
            density=s.get("density"),
            drop_prob=s.get("drop_prob"),
            seed=s.get("seed", 0),
            lam=s.get("lambda", 1.0),
            overwrite=bool(s.get("overwrite", False)),
            compute_dtype=getattr(torch, s.get("compute_dtype", "float32")),
            progress=not args.no_progress,
            max_shard_size=s.get("max_shard_size", "5GB"),
        )
    except OSError as err:  # e.g. no permission or no space for the output: one line, no traceback
        raise DemError(f"{err.filename or s['out']}: {err.strerror or err}") from None
    print(out)
    return 0


def _run_vectors_extract(args: argparse.Namespace) -> int:
    from dem.vectors import extract_vector

    print(
        extract_vector(
            args.base, args.model, args.out, overwrite=args.overwrite, progress=not args.no_progress
        )
    )
    return 0
