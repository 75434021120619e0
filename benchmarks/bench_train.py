"""Throughput of ``dem finetune``'s training loop vs a plain transformers ``Trainer``.

Both train the same freshly initialised tiny default model (hidden 128, 4 layers) on the
same length-bucketed batches (the four built-in sources mixed equally), same optimizer
settings, for the same number of steps; reps alternate between the two so that load from
other processes hits both alike. Reports tokens/s (non-padding tokens / training wall time),
the ratio (goal >= 1.0) and the padding fraction of the batches (goal <= 10%).

    python benchmarks/bench_train.py [--steps 60] [--reps 3] [--batch-size 32] [--out DIR]

Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

SOURCES = ("arithmetic", "arithmetic_cot", "word_edit", "facts")


def batches_and_base(folder: Path, steps: int, batch_size: int, max_length: int):
    """The tiny base saved in ``folder`` and the exact batches ``finetune`` will train on."""
    from dem.models import build_tiny_model, save_model
    from dem.sources import get_source
    from dem.sources.data import build_tiny_tokenizer, encode_examples, pad_batch
    from dem.training.schedule import build_schedule

    tokenizer = build_tiny_tokenizer()
    base = save_model(build_tiny_model(tokenizer), tokenizer, folder / "base")
    encoded = {
        s: encode_examples(tokenizer, get_source(s).examples("train"), max_length) for s in SOURCES
    }
    lengths = {s: [len(e["input_ids"]) for e in rows] for s, rows in encoded.items()}
    schedule = build_schedule(
        lengths, dict.fromkeys(SOURCES, 1.0), n_batches=steps, batch_size=batch_size, seed=0
    )
    batches = [pad_batch([encoded[s][i] for s, i in b], tokenizer.pad_token_id) for b in schedule]
    return base, batches


def run_dem(base: Path, out: Path, steps: int, batch_size: int, max_length: int) -> float:
    """tokens/s of dem.training's loop (log wall time: steps only, no setup)."""
    import pandas as pd

    from dem.training.finetune import finetune

    finetune(
        base, out, mixture=dict.fromkeys(SOURCES, 1.0), steps=steps, batch_size=batch_size,
        lr=1e-3, warmup_steps=steps // 10, eval_every=steps, max_length=max_length,
        progress=False, overwrite=True,
    )  # fmt: skip
    log = pd.read_csv(out / "train_log.csv")
    return log["tokens"].sum() / log["wall_s"].iloc[-1]


def run_trainer(base: Path, out: Path, batches: list[dict], steps: int) -> float:
    """tokens/s of a plain Trainer fed the very same batches (one pre-built batch per item)."""
    from transformers import Trainer, TrainingArguments

    from dem.models import load_model

    model, _ = load_model(base)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=1,
        learning_rate=1e-3, warmup_steps=steps // 10, lr_scheduler_type="cosine",
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=10_000, save_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=batches, data_collator=lambda items: items[0]
    )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    return sum(int(b["attention_mask"].sum()) for b in batches[:steps]) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    from dem.models import set_cpu_threads
    from dem.sources.data import padding_fraction

    hf_logging.disable_progress_bar()
    threads = set_cpu_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, batches = batches_and_base(tmp, args.steps, args.batch_size, args.max_length)
        dem_rates, trainer_rates = [], []
        for rep in range(args.reps):
            dem_rates.append(
                run_dem(base, tmp / "dem", args.steps, args.batch_size, args.max_length)
            )
            trainer_rates.append(run_trainer(base, tmp / "trainer", batches, args.steps))
            print(
                f"rep {rep}: dem {dem_rates[-1]:.0f} tok/s, Trainer {trainer_rates[-1]:.0f} tok/s",
                flush=True,
            )
    result = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "threads": threads,
        "torch": torch.__version__,
        "dem_tokens_per_s": dem_rates,
        "trainer_tokens_per_s": trainer_rates,
        "dem_median": statistics.median(dem_rates),
        "trainer_median": statistics.median(trainer_rates),
        # Best of the reps: the run least disturbed by other processes on a shared machine.
        "dem_best": max(dem_rates),
        "trainer_best": max(trainer_rates),
        "ratio_best": max(dem_rates) / max(trainer_rates),
        "ratio_median": statistics.median(
            d / t for d, t in zip(dem_rates, trainer_rates, strict=True)
        ),
        "padding_fraction": padding_fraction(batches),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
