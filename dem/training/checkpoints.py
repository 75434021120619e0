"""Checkpoints: everything an interrupted run needs to continue exactly where it stopped.

A checkpoint holds the model, the AdamW state, the scheduler, the RNG state and the log so far:
safetensors for tensors, JSON for the rest, so nothing is ever unpickled. It is written to a
temporary folder and renamed into place, so the last complete checkpoint always survives.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dem.io import atomic_output_dir
from dem.training.runs import CHECKPOINT, write_record


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return tensors


def _set_rng(tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(work: Path, model: Any, optimizer: Any, scheduler: Any, state: dict) -> None:
    """Write ``work/checkpoint`` (replacing the previous one only once the new one is whole)."""
    from safetensors.torch import save_file

    with atomic_output_dir(work / CHECKPOINT, overwrite=True) as tmp:
        # state_dict() of a tied model lists the shared tensor twice; clone so safetensors
        # (which refuses aliased storage) gets independent tensors.
        weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        write_record(tmp / "state.json", {**state, "optimizer": opt_meta, "scheduler": sched})


def load_checkpoint(work: Path, model: Any, optimizer: Any, scheduler: Any) -> dict | None:
    """Restore the last checkpoint into model/optimizer/scheduler/RNG; its state, or None."""
    from safetensors.torch import load_file

    folder = work / CHECKPOINT
    if not (folder / "state.json").is_file():
        return None
    state = json.loads((folder / "state.json").read_text())
    weights = load_file(folder / "model.safetensors")
    model.load_state_dict(weights)
    _load_optimizer(optimizer, load_file(folder / "optimizer.safetensors"), state["optimizer"])
    scheduler.load_state_dict(
        {**state["scheduler"], "lr_lambdas": [None] * len(scheduler.base_lrs)}
    )
    _set_rng(load_file(folder / "rng.safetensors"))
    return state
