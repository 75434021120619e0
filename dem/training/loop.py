"""The training loop shared by pretraining and fine-tuning, and its validation loss.

It is an `accelerate` loop rather than transformers' ``Trainer``: the exact-resume rule (see
:mod:`dem.training.schedule`) needs control of the data order and of what a checkpoint holds
(``Trainer`` pickles its RNG state and reshuffles through its own sampler), and the loop is as
fast as ``Trainer`` on the same batches (``benchmarks/bench_train.py``: 1.05x on the tiny model,
one CPU thread). ``Accelerator`` adds nothing on one CPU and still gives device placement, bf16
autocast and data parallelism under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch

from dem import DemError
from dem import models as dem_models
from dem import progress as dem_progress
from dem.data import pad_batch
from dem.evaluate import response_nll
from dem.training.checkpoints import load_checkpoint, save_checkpoint

# beta2 = 0.99 rather than torch's 0.999: runs here are a few hundred steps, and a 1000-step
# memory of early, large gradients keeps the effective step size too small (as in nanoGPT's
# small-model configs).
ADAM_BETAS = (0.9, 0.99)


class LoopSettings(Protocol):
    """What the loop reads of :class:`~dem.training.settings.FinetuneSettings` or
    :class:`~dem.training.settings.PretrainSettings`."""

    steps: int
    grad_accum: int
    lr: float
    warmup_steps: int
    weight_decay: float
    max_grad_norm: float
    eval_every: int
    save_every: int | None
    seed: int


def accelerator_for(device: str) -> Any:
    """The Accelerator of this process: device, bf16 autocast on capable GPUs, processes.

    Under ``accelerate launch`` / ``torchrun`` every process gets one GPU and the loop's
    micro-batches are split between them (data parallel); alone, it is a plain device.
    """
    from accelerate import Accelerator

    dev = dem_models.pick_device(device)
    bf16 = dem_models.pick_dtype(dev) == torch.bfloat16
    return Accelerator(cpu=dev.type == "cpu", mixed_precision="bf16" if bf16 else "no")


@contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' own load/save progress bars when ours is off (notebooks, tests).

    Also under ``dem run``: those bars would land in the executed notebook, where ours do not.
    """
    from transformers.utils import logging as hf_logging

    enabled = enabled and not os.environ.get(dem_progress.PROGRESS_FILE)
    before = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before and not enabled:
            hf_logging.enable_progress_bar()


def validation_loss(
    model: Any, batches: Mapping[str, list[dict]], device: torch.device, autocast: Any
) -> dict[str, float]:
    """Token-weighted mean response loss over all validation batches, and per source."""
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad(), autocast():
        for name, source_batches in batches.items():
            for batch in source_batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                nll, scored = response_nll(model, batch, reduction="sum", skip_prompt=False)
                sums[name] = sums.get(name, 0.0) + float(nll)
                counts[name] = counts.get(name, 0) + int(scored.sum())
    model.train()
    result = {f"val_loss_{k}": sums[k] / max(1, counts[k]) for k in sums}
    result["val_loss"] = sum(sums.values()) / max(1, sum(counts.values()))
    return result


def train_loop(
    model: Any,
    tokenizer: Any,
    work: Path,
    *,
    settings: LoopSettings,
    schedule: list[list[tuple[str, int]]],
    encoded: Mapping[str, list[dict]],
    val_batches: Mapping[str, list[dict]],
    accelerator: Any,
    progress: bool,
    callback: Callable[[int, dict], None] | None,
) -> dict:
    """Run (or resume) the optimisation in ``work``; return the cost record."""
    from transformers import get_cosine_schedule_with_warmup

    s = settings
    steps, grad_accum = s.steps, s.grad_accum
    save_every = s.save_every or s.eval_every
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(schedule) != steps * grad_accum * world:
        raise AssertionError("schedule length does not match steps x grad_accum x processes")

    torch.manual_seed(s.seed)
    # N of the 6·N·tokens estimate: every parameter the forward pass runs through (with LoRA:
    # the frozen base plus the adapters). With frozen weights the backward pass skips their
    # weight gradients (about a third of the 6N), so for LoRA the estimate is an upper bound.
    n_params = dem_models.count_parameters(model)
    # Frozen parameters (LoRA's base) get no optimizer state; in full fine-tuning this is
    # every parameter, in the same order as model.parameters().
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    # The fused kernel (CPU and CUDA) updates all tensors in one call: for a tiny model the
    # per-tensor Python loop of the default implementation costs ~25% of a step.
    fused = accelerator.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        trainable, lr=s.lr, betas=ADAM_BETAS, weight_decay=s.weight_decay, fused=fused
    )
    # Warmup is capped at half the run, so short smoke runs with the default warmup still decay.
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(s.warmup_steps, steps // 2), steps)
    state = load_checkpoint(work, model, optimizer, scheduler) or {
        "step": 0,
        "log": [],
        "wall_s": 0.0,
    }
    start_step, log = state["step"], state["log"]
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id = tokenizer.pad_token_id

    # Tokens are counted from the global schedule, so every process agrees without talking.
    def batch_of(i: int) -> dict[str, torch.Tensor]:
        return pad_batch([encoded[name][idx] for name, idx in schedule[i]], pad_id)

    bar = dem_progress.bar(
        total=steps,
        initial=start_step,
        enabled=progress and accelerator.is_main_process,
        desc=f"training {work.name.removesuffix('.partial')}",
        unit="step",
    )
    wall_before = float(state["wall_s"])
    t_start = time.perf_counter()
    for step in range(start_step + 1, steps + 1):
        t_step = time.perf_counter()
        first = (step - 1) * grad_accum * world
        step_batches = [batch_of(first + j) for j in range(grad_accum * world)]
        n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in step_batches)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in step_batches)
        mine = step_batches[rank::world]
        loss_sum = torch.zeros((), device=accelerator.device)
        for j, batch in enumerate(mine):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            # Gradient sync only on the last micro-batch of the step (DDP all-reduce once).
            sync = nullcontext() if j == len(mine) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                # The loss is a sum over the step's response tokens divided by their global
                # count, so micro-batches of different lengths are weighted by tokens, as one
                # big batch would be; x world undoes DDP's gradient averaging.
                loss = model(
                    **batch,
                    num_items_in_batch=torch.tensor(n_targets, device=batch["labels"].device),
                ).loss
                accelerator.backward(loss * world)
            loss_sum += loss.detach()
        loss_value = float(accelerator.reduce(loss_sum, "sum")) if world > 1 else float(loss_sum)
        if not math.isfinite(loss_value):
            last = state["step"]
            raise DemError(
                f"training loss became {loss_value} at step {step} (lr={s.lr}); the last good "
                f"checkpoint (step {last}) is kept in {work}; lower the learning rate and rerun "
                "with overwrite=True"
            )
        if s.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        current_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        row: dict[str, Any] = {
            "step": step,
            "loss": loss_value,
            "val_loss": None,
            "tokens": n_tokens,
            "response_tokens": n_targets,
            "wall_s": wall_before + time.perf_counter() - t_start,
            "tokens_per_s": n_tokens / max(1e-9, time.perf_counter() - t_step),
            "lr": current_lr,
        }
        if step % s.eval_every == 0 or step == steps:
            unwrapped = accelerator.unwrap_model(model)
            row.update(
                validation_loss(unwrapped, val_batches, accelerator.device, accelerator.autocast)
            )
        log.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % save_every == 0 and step < steps:
            state = {"step": step, "log": log, "wall_s": row["wall_s"]}
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model)
                save_checkpoint(work, unwrapped, optimizer, scheduler, state)
            accelerator.wait_for_everyone()
        if callback is not None:
            callback(step, row)
    bar.close()

    model = accelerator.unwrap_model(model)
    train_tokens = sum(r["tokens"] for r in log)
    wall_s = wall_before + time.perf_counter() - t_start
    return {
        "train_tokens": train_tokens,
        "response_tokens": sum(r["response_tokens"] for r in log),
        "flops": 6 * n_params * train_tokens,
        "params": n_params,
        "trainable_params": sum(p.numel() for p in trainable),
        "wall_s": wall_s,
        "steps": steps,
        "examples": sum(len(b) for b in schedule),
        "tokens_per_s": train_tokens / wall_s if wall_s > 0 else None,
        "processes": world,
        "_log": log,
        "_model": model,
        "_main": accelerator.is_main_process,
    }
