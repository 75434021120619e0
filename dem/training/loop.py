"""The training loop shared by pretraining and fine-tuning, and its validation loss.

It is an `accelerate` loop rather than transformers' ``Trainer``: the exact-resume rule (see
:mod:`dem.training.schedule`) needs control of the data order and of what a checkpoint holds
(``Trainer`` pickles its RNG state and reshuffles through its own sampler), and the loop is as
fast as ``Trainer`` on the same batches (``benchmarks/bench_train.py``: 1.05x on the tiny model,
one CPU thread). ``Accelerator`` adds nothing on one CPU and still gives device placement and
data parallelism under ``accelerate launch`` / ``torchrun``.
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

from dem import DemError, precision
from dem import models as dem_models
from dem import progress as dem_progress
from dem.evaluation.evaluate import response_nll
from dem.sources.data import pad_batch
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
    dtype: str  # float32 or bfloat16 (auto: dem.precision's rule for a tiny base)


def accelerator_for(device: str) -> Any:
    """The Accelerator of this process: its device and processes.

    Under ``accelerate launch`` / ``torchrun`` every process gets one GPU and the loop's
    micro-batches are split between them (data parallel); alone, it is a plain device. bf16 is
    the loop's own autocast (:mod:`dem.precision`), not accelerate's ``mixed_precision``: that
    is fixed once per process, and a chapter trains tiny and real bases in one process.
    """
    from accelerate import Accelerator

    dev = dem_models.pick_device(device)
    return Accelerator(cpu=dev.type == "cpu", mixed_precision="no")


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
    model: Any, batches: Mapping[str, list[dict]], device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Token-weighted mean response loss over all validation batches, and per source."""
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with torch.no_grad(), precision.autocast(device, dtype):
        for name, source_batches in batches.items():
            for batch in source_batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                nll, scored = response_nll(model, batch, reduction="sum")
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
    s = settings
    steps, world = s.steps, accelerator.num_processes
    dtype = precision.pick_dtype(accelerator.device, s.dtype)
    save_every = s.save_every or s.eval_every
    if len(schedule) != steps * s.grad_accum * world:
        raise AssertionError("schedule length does not match steps x grad_accum x processes")

    torch.manual_seed(s.seed)
    # Frozen parameters (LoRA's base) get no optimizer state; in full fine-tuning this is
    # every parameter, in the same order as model.parameters().
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer, scheduler = _optimizer(trainable, s, accelerator.device)
    fresh = {"step": 0, "log": [], "wall_s": 0.0}
    state = load_checkpoint(work, model, optimizer, scheduler) or fresh
    log = state["log"]
    model, optimizer = accelerator.prepare(model, optimizer)
    step_of = _Steps(schedule, encoded, tokenizer.pad_token_id, s.grad_accum, accelerator)
    bar = dem_progress.bar(total=steps, initial=state["step"], unit="step",
                           enabled=progress and accelerator.is_main_process,
                           desc=f"training {work.name.removesuffix('.partial')}")  # fmt: skip
    clock = _Clock(float(state["wall_s"]))
    for step in range(state["step"] + 1, steps + 1):
        row = _optimizer_step(step, model, optimizer, scheduler, step_of, dtype, clock, s)
        if not math.isfinite(row["loss"]):
            raise DemError(
                f"training loss became {row['loss']} at step {step} (lr={s.lr}); the last good "
                f"checkpoint (step {state['step']}) is kept in {work}; lower the learning rate "
                "and rerun with overwrite=True"
            )
        if step % s.eval_every == 0 or step == steps:
            unwrapped = accelerator.unwrap_model(model)
            row.update(validation_loss(unwrapped, val_batches, accelerator.device, dtype))
        log.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if step % save_every == 0 and step < steps:
            state = {"step": step, "log": log, "wall_s": row["wall_s"]}
            _save(work, accelerator, model, optimizer, scheduler, state)
        if callback is not None:
            callback(step, row)
    bar.close()
    return _cost_record(log, schedule, trainable, clock, accelerator, model, steps)


def _save(work: Path, accelerator: Any, model, optimizer, scheduler, state: dict) -> None:
    """A checkpoint to resume from, written by the main process while the others wait."""
    if accelerator.is_main_process:
        save_checkpoint(work, accelerator.unwrap_model(model), optimizer, scheduler, state)
    accelerator.wait_for_everyone()


def _optimizer(trainable: list, s: LoopSettings, device: torch.device) -> tuple[Any, Any]:
    """AdamW and its schedule: linear warmup (capped at half the run, so short smoke runs with
    the default warmup still decay), then cosine decay."""
    from transformers import get_cosine_schedule_with_warmup

    # The fused kernel (CPU and CUDA) updates all tensors in one call: for a tiny model the
    # per-tensor Python loop of the default implementation costs ~25% of a step.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(
        trainable, lr=s.lr, betas=ADAM_BETAS, weight_decay=s.weight_decay, fused=fused
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, min(s.warmup_steps, s.steps // 2), s.steps
    )
    return optimizer, scheduler


class _Clock:
    """Wall time of the run, resumed runs included."""

    def __init__(self, before: float):
        self.before, self.start = before, time.perf_counter()

    def wall(self) -> float:
        return self.before + time.perf_counter() - self.start


class _Steps:
    """The micro-batches of one optimizer step, from the global schedule: all processes', and
    this process's share."""

    def __init__(self, schedule, encoded, pad_id: int, grad_accum: int, accelerator: Any):
        self.schedule, self.encoded, self.pad_id = schedule, encoded, pad_id
        self.per_step = grad_accum * accelerator.num_processes
        self.accelerator = accelerator

    def __call__(self, step: int) -> list[dict[str, torch.Tensor]]:
        first = (step - 1) * self.per_step
        return [
            pad_batch([self.encoded[n][i] for n, i in self.schedule[first + j]], self.pad_id)
            for j in range(self.per_step)
        ]


def _optimizer_step(step, model, optimizer, scheduler, step_of: _Steps, dtype, clock, s) -> dict:
    """One optimizer step over its micro-batches; the step's row of the training log."""
    accelerator = step_of.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    t_step = time.perf_counter()
    step_batches = step_of(step)
    # Tokens are counted from the global schedule, so every process agrees without talking.
    n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in step_batches)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in step_batches)
    mine = step_batches[rank::world]
    loss_sum = torch.zeros((), device=accelerator.device)
    for j, batch in enumerate(mine):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        # Gradient sync only on the last micro-batch of the step (DDP all-reduce once).
        sync = nullcontext() if j == len(mine) - 1 else accelerator.no_sync(model)
        with sync, precision.autocast(accelerator.device, dtype):
            # The loss is a sum over the step's response tokens divided by their global
            # count, so micro-batches of different lengths are weighted by tokens, as one
            # big batch would be; x world undoes DDP's gradient averaging. response_nll
            # computes the LM head only from the batch's first response position on: with a
            # 50k vocabulary the prompt's logits are most of a short example's step
            # (benchmarks/bench_response_logits.py), and no loss falls on them.
            nll, _ = response_nll(model, batch, reduction="sum")
            loss = nll / n_targets
            accelerator.backward(loss * world)
        loss_sum += loss.detach()
    loss_value = float(accelerator.reduce(loss_sum, "sum")) if world > 1 else float(loss_sum)
    if math.isfinite(loss_value):
        if s.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), s.max_grad_norm)
        current_lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    else:  # the caller stops; this step changes nothing
        current_lr = scheduler.get_last_lr()[0]
    return {
        "step": step,
        "loss": loss_value,
        "val_loss": None,
        "tokens": n_tokens,
        "response_tokens": n_targets,
        "wall_s": clock.wall(),
        "tokens_per_s": n_tokens / max(1e-9, time.perf_counter() - t_step),
        "lr": current_lr,
    }


def _cost_record(log, schedule, trainable, clock, accelerator, model, steps) -> dict:
    model = accelerator.unwrap_model(model)
    # N of the 6·N·tokens estimate: every parameter the forward pass runs through (with LoRA:
    # the frozen base plus the adapters). With frozen weights the backward pass skips their
    # weight gradients (about a third of the 6N), so for LoRA the estimate is an upper bound.
    n_params = dem_models.count_parameters(model)
    train_tokens = sum(r["tokens"] for r in log)
    wall_s = clock.wall()
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
        "processes": accelerator.num_processes,
        "_log": log,
        "_model": model,
        "_main": accelerator.is_main_process,
    }
