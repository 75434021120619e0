"""``dem pretrain`` and ``dem finetune``: options and the calls into training."""

from __future__ import annotations

import argparse

from dem import DemError
from dem.cli.sources import _source_spec


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
