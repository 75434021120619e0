"""A peft LoRA adapter as a merge input: its distribution vector, formed block by block.

A LoRA fine-tune of θ0 is θ0 + s·B·A in each adapted matrix (A: r × in, B: out × r, s = α/r, or
α/√r with rsLoRA) and θ0 elsewhere, so its distribution vector is v = s·B·A, zero outside the
adapted matrices. ``dem merge --model ADAPTER_FOLDER=W`` forms rows r0:r1 of v as
s·B[r0:r1]·A when the merge reaches them: the fine-tuned model is never materialised.

Only what that formula covers is accepted; anything else in ``adapter_config.json`` that changes
the fine-tuned weights (DoRA, modules_to_save, …) is refused with the file and the field.
Weights are read from ``adapter_model.safetensors`` only; nothing is unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dem import DemError
from dem.merging.safetensors_io import WeightFolder

ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
# Fields that make the fine-tuned model something other than θ0 + s·B·A, with the value that
# means "not used"; a config holding anything else is refused by name.
UNSUPPORTED = {
    "use_dora": False,  # DoRA rescales each column by a learned magnitude
    "modules_to_save": None,  # whole modules trained and saved beside the adapter
    "alpha_pattern": {},  # per-module α (ranks come from the tensors' shapes, so rank_pattern works)
    "fan_in_fan_out": False,  # Conv1D layers (GPT-2) store the transpose
    "bias": "none",  # trained biases saved beside the adapter
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,  # LoRA on raw parameters (MoE experts)
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,  # aLoRA applies only after given tokens: no weight delta
}


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class _Pair:
    a: str  # tensor names in the adapter file
    b: str
    scaling: float


class LoraAdapter:
    """The LoRA pairs of an adapter folder, keyed by the base tensor each one updates."""

    def __init__(self, folder: Path, base: WeightFolder) -> None:
        self.folder = folder
        config_file = folder / ADAPTER_CONFIG
        try:
            self.config = json.loads(config_file.read_text())
        except (OSError, ValueError) as err:
            raise DemError(f"{config_file}: cannot read it as JSON ({err})") from None
        self._check_config(config_file)
        self.weights = WeightFolder(folder, prefix="adapter_model", role="adapter")
        self.pairs: dict[str, _Pair] = {}
        self._index(base)

    def _check_config(self, file: Path) -> None:
        c = self.config
        if c.get("peft_type", "LORA") != "LORA":
            raise DemError(f"{file}: peft_type {c['peft_type']!r} is not supported (only LORA)")
        for field, unused in UNSUPPORTED.items():
            value = c.get(field, unused)
            if value != unused and value not in (None, {}, [], False):
                raise DemError(
                    f"{file}: {field} = {json.dumps(value)} is not supported; dem merges plain "
                    f"LoRA (θ0 + s·B·A), so {field} must be {json.dumps(unused)}"
                )
        alpha = c.get("lora_alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise DemError(f"{file}: lora_alpha = {json.dumps(alpha)}; expected a positive number")

    def _index(self, base: WeightFolder) -> None:
        file = self.weights.files[0]
        alpha, rslora = float(self.config["lora_alpha"]), bool(self.config.get("use_rslora"))
        for name in self.weights.names:
            module, dot, kind = name.removeprefix(PREFIX).rpartition(".lora_")
            if not dot or kind not in ("A.weight", "B.weight") or not name.startswith(PREFIX):
                raise DemError(
                    f"{file}: tensor {name!r} is not a LoRA matrix "
                    f"(expected {PREFIX}<module>.lora_A.weight and .lora_B.weight)"
                )
            a, b = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
            if a not in self.weights.tensors or b not in self.weights.tensors:
                raise DemError(f"{file}: module {module!r} has lora_{kind[0]} but not both A and B")
            target = f"{module}.weight"
            info = base.tensors.get(target)
            shape_a, shape_b = self.weights.tensors[a].shape, self.weights.tensors[b].shape
            if info is None or not info.is_float or len(info.shape) != 2:
                raise DemError(f"{file}: LoRA on {module!r}, but base {base.folder} has no "
                               f"floating-point matrix {target!r}")  # fmt: skip
            if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1] or (
                (shape_b[0], shape_a[1]) != info.shape
            ):  # fmt: skip
                raise DemError(
                    f"{file}: LoRA on {module!r} has A {list(shape_a)} and B {list(shape_b)}, "
                    f"which do not make B·A of the base's shape {list(info.shape)}"
                )
            r = shape_a[0]
            self.pairs[target] = _Pair(a, b, alpha / (math.sqrt(r) if rslora else r))

    def vector_rows(self, name: str, r0: int, r1: int, like: torch.Tensor) -> torch.Tensor:
        """Rows r0:r1 of v = s·B·A for base tensor ``name`` (zero if not adapted), as ``like``."""
        pair = self.pairs.get(name)
        if pair is None:
            return torch.zeros_like(like)
        b = self.weights.tensor(pair.b)[r0:r1].to(like.dtype)
        a = self.weights.tensor(pair.a).to(like.dtype)
        return torch.matmul(b, a).mul_(pair.scaling).to(like.device)

    def record(self) -> dict:
        """What the merge record says about this adapter besides its hash."""
        keys = ("base_model_name_or_path", "r", "lora_alpha", "use_rslora", "target_modules")
        return {k: self.config.get(k) for k in keys} | {"adapted": len(self.pairs)}
