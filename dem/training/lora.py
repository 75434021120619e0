"""LoRA fine-tuning through peft: wrap the model in adapters; later merge them into the weights.

The adapters are merged before saving (``merge_and_unload``), so a LoRA run still writes an
ordinary full model folder, and its distribution vector is the merged adapter update: nonzero
only in the targeted matrices, each of rank at most ``lora_r``. The peft adapter is saved too,
in the folder's ``adapter/`` (:data:`ADAPTER_DIR`): a merge input on its own (``dem merge``
forms s·B·A from it block by block, :mod:`dem.merging.adapters`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from dem import DemError
from dem.models import first_line

ADAPTER_DIR = "adapter"  # a LoRA fine-tune's peft adapter, inside its model folder


def require_peft() -> None:
    """Raise a DemError naming the install command if peft is missing."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise DemError(
            "LoRA (lora_r > 0) needs the peft package: pip install 'dem[lora]'"
        ) from None


def add_lora(model: Any, base: str | Path, lora: dict, *, seed: int, checkpointing: bool) -> Any:
    """Wrap ``model`` in LoRA adapters (peft): from here on only the adapters train.

    ``lora`` is :meth:`~dem.training.settings.FinetuneSettings.lora`'s record: rank ``r``,
    scale ``alpha`` (the update is alpha / r x B A), input ``dropout`` and the ``target``
    modules -- ``"all-linear"`` or comma-separated module names.
    """
    from peft import LoraConfig, get_peft_model

    target = lora["target"]
    modules = (
        target if target == "all-linear" else [t.strip() for t in target.split(",") if t.strip()]
    )
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=modules,
        task_type="CAUSAL_LM",
    )
    if checkpointing:
        # With frozen embeddings nothing entering a checkpointed block requires grad, and
        # reentrant checkpointing would then drop the adapters' gradients. transformers 5 does
        # this when checkpointing is enabled; older versions and remote code may not.
        model.enable_input_require_grads()
    # The adapters' random init (A; B starts at zero) must be the same on every (re)run.
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            # peft reads transformers' deprecated name; nothing for the user to change.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated")
            return get_peft_model(model, config)
    except ValueError as err:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise DemError(
            f"lora_target={target!r} does not fit model {base} ({first_line(err)}); "
            f"its linear layers are: {', '.join(linear)}"
        ) from None


def merge_lora(model: Any) -> Any:
    """W + (alpha / r) B A into the base weights, adapters removed: an ordinary model."""
    return model.merge_and_unload()
