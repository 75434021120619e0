"""The training knobs, listed once: each a dataclass field with its default and why.

Everything else derives from these lists: the parameters a run records (and compares to decide
whether a folder holds the same run), the ``dem pretrain`` / ``dem finetune`` options and their
help, validation, and a notebook's call (:meth:`Settings.from_params` reads a notebook's
parameter names, e.g. ``learning_rate`` for ``lr``). Nothing here imports torch, so the
command line can build its options from these fields cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from dem import DemError
from dem.config import CORPORA, default_of

# The embedded default's training settings (dem/config.py explains each value): `dem finetune`
# with no options trains a shipped tiny base as the tutorial's chapter 02 does. A real LM (20M+
# parameters, dem.precision.is_large) gets smollm2-cpu.yaml's LoRA setting, r 8 at lr 1e-3;
# full fine-tuning of a real LM gets 2e-5, the usual range. benchmarks/probe_defaults.py
# (docs/results.md, "Defaults for a real model"): on SmolLM2-135M, 200 default steps on
# arithmetic lift it 0.06 -> 0.97 (LoRA) and 0.94 (full, 2e-5) and lower the other sources'
# loss; full fine-tuning at the tiny bases' lr (1e-3, 2e-4) wrecks the other sources.
REAL_LM_LORA_R = 8
REAL_LM_LR = {"lora": 1e-3, "full": 2e-5}

# ----------------------------------------------------------------------------------------------
# Checks, named by what they accept
# ----------------------------------------------------------------------------------------------


def positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise DemError(f"{name} must be a positive integer, got {value!r}")


def count(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 0:
        raise DemError(f"{name} must be an integer >= 0, got {value!r}")


def positive_number(name: str, value: Any) -> None:
    if not (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        raise DemError(f"{name} must be a positive number, got {value!r}")


def _unset_or_positive_int(name: str, value: Any) -> None:
    if value:  # None (or 0) means "the default": for save_every, every eval_every steps
        positive_int(name, value)


def _unset_or_positive_number(name: str, value: Any) -> None:
    if value is not None:
        positive_number(name, value)


def _lora_r(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DemError(f"{name} must be an integer >= 0 (0 = full fine-tuning), got {value!r}")


def _unset_or_lora_r(name: str, value: Any) -> None:
    if value is not None:
        _lora_r(name, value)


def _dtype(name: str, value: Any) -> None:
    from dem.precision import DTYPES  # read lazily: it imports torch

    if value not in DTYPES:
        raise DemError(f"{name} must be one of {', '.join(DTYPES)}, got {value!r}")


def _probability(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise DemError(f"{name} must be a number in [0, 1), got {value!r}")


def _module_names(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip(" ,"):
        raise DemError(
            f"{name} must name modules (e.g. 'all-linear', 'q_proj,v_proj'), got {value!r}"
        )


def _corpus(name: str, value: Any) -> None:
    if value not in CORPORA:
        raise DemError(f"{name} must be one of {', '.join(CORPORA)}, got {value!r}")


def setting(
    default: Any,
    help: str,
    *,
    check: Callable[[str, Any], None] | None = None,
    recorded: bool = True,
) -> Any:
    """A settings field: its default, a one-line help (what and why), its check.

    ``recorded=False``: the setting changes how a run executes, not what it computes (device,
    activation recomputation), so it is not part of the run's parameters.
    """
    return field(default=default, metadata={"help": help, "check": check, "recorded": recorded})


# ----------------------------------------------------------------------------------------------
# What every settings class shares
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Base of the settings dataclasses: validation, overrides, notebook parameters."""

    # Notebook parameter name -> field name, for parameters a notebook names differently.
    NOTEBOOK_NAMES: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.metadata.get("check"):
                f.metadata["check"](f.name, getattr(self, f.name))
        self._check_together()

    def _check_together(self) -> None:
        """Checks that involve several fields (none by default)."""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def updated(self, **overrides: Any) -> Settings:
        """A copy with ``overrides`` applied; an unknown name is an error that lists the known."""
        unknown = sorted(set(overrides) - set(self.names()))
        if unknown:
            raise DemError(
                f"unknown {type(self).__name__} parameter(s) {', '.join(unknown)}; "
                f"known: {', '.join(self.names())}"
            )
        return replace(self, **overrides) if overrides else self

    @classmethod
    def from_params(cls, params: Mapping[str, Any], **overrides: Any) -> Settings:
        """The settings a notebook's parameters (a dict) name, defaults for the rest.

        Picks the keys in ``NOTEBOOK_NAMES`` (renamed to fields, e.g. ``learning_rate`` ->
        ``lr``) and ignores every other key, so a chapter can pass its whole parameter dict.
        ``overrides`` (field names) win, e.g. a per-source ``steps``.
        """
        picked: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, name in cls.NOTEBOOK_NAMES.items():
            if key in params:
                if name in picked and picked[name] != params[key]:
                    other = given_as[name]
                    raise DemError(
                        f"parameters {key}={params[key]!r} and {other}={picked[name]!r} disagree "
                        f"(both set {name})"
                    )
                picked[name], given_as[name] = params[key], key
        return cls().updated(**{**picked, **overrides})


# ----------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    """How one fine-tune (one source or a DMix mixture) is trained."""

    steps: int = setting(default_of("finetune_steps"), "optimizer steps", check=positive_int)
    batch_size: int = setting(
        default_of("batch_size"), "examples per micro-batch", check=positive_int
    )
    grad_accum: int = setting(
        1,
        "micro-batches per optimizer step: a larger batch in the memory of one micro-batch",
        check=positive_int,
    )
    eval_every: int = setting(
        default_of("eval_every"), "validation loss every N steps", check=positive_int
    )
    max_length: int = setting(
        default_of("max_length"),
        "max tokens per example (prompt + response); longer training examples are dropped, "
        "longer validation examples truncated, both reported",
        check=positive_int,
    )
    save_every: int | None = setting(
        None,
        "checkpoint every N steps, from which an interrupted run resumes (unset: eval_every)",
        check=_unset_or_positive_int,
    )
    warmup_steps: int = setting(
        default_of("warmup_steps"),
        "linear warmup steps (capped at half the run, so short runs still decay)",
        check=count,
    )
    lr: float | None = setting(
        None,
        "peak AdamW learning rate (cosine decay); unset: 2e-4 (the tutorial's) for full "
        "fine-tuning of a tiny base, 1e-3 for LoRA and 2e-5 for full fine-tuning of a real LM",
        check=_unset_or_positive_number,
    )
    weight_decay: float = setting(
        0.0,
        "AdamW weight decay; off, because it would add a shrink-towards-zero part to every "
        "distribution vector that no data asked for",
    )
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: no clipping)")
    seed: int = setting(0, "seed of initialisation, data and order")
    device: str = setting(
        "auto", "auto, cpu, cuda, mps (auto: cuda, then mps, then cpu)", recorded=False
    )
    gradient_checkpointing: bool | None = setting(
        None,
        "recompute activations in the backward pass to save memory (unset: on for GPUs under "
        "40 GB, off on larger GPUs and on CPU); the weights come out the same",
        recorded=False,
    )
    # LoRA settings are recorded through lora() (and only for LoRA runs), so full fine-tuning
    # runs made before LoRA existed keep their parameters and stay cached.
    lora_r: int | None = setting(
        None,
        "train rank-r LoRA adapters (peft) instead of every weight, merged into the weights at "
        "the end, so the output is an ordinary model folder (0: full fine-tuning); unset: 8 for "
        "a real LM (20M+ parameters: small deltas, 1.6x the tokens/s), 0 for a tiny base",
        check=_unset_or_lora_r,
        recorded=False,
    )
    lora_alpha: float | None = setting(
        None,
        "LoRA scale alpha: the update is alpha / r x B A (unset: 2 x lora_r)",
        check=_unset_or_positive_number,
        recorded=False,
    )
    lora_dropout: float = setting(
        0.0, "dropout on the LoRA input", check=_probability, recorded=False
    )
    lora_target: str = setting(
        "all-linear",
        "modules that get adapters: all-linear (every linear layer but the output head) or "
        "comma-separated names such as q_proj,v_proj",
        check=_module_names,
        recorded=False,
    )

    dtype: str = setting(
        "auto",
        "float32, bfloat16 (autocast; weights stay float32) or auto: bf16 on GPUs that have it "
        "and for a real LM on CPUs with avx512_bf16 (measured faster at equal accuracy there)",
        check=_dtype,
        recorded=False,  # the machine record holds it, and a resume refuses another
    )

    def for_base(self, large: bool) -> FinetuneSettings:
        """The unset ``lora_r`` and ``lr`` chosen for a real LM (``large``) or a tiny base."""
        lora_r = self.lora_r if self.lora_r is not None else (REAL_LM_LORA_R if large else 0)
        if self.lr is not None:
            lr = self.lr
        elif large:
            lr = REAL_LM_LR["lora" if lora_r else "full"]
        else:
            lr = default_of("learning_rate")
        return replace(self, lora_r=lora_r, lr=lr)

    def _check_together(self) -> None:
        if self.lora_r == 0 and (
            self.lora_alpha is not None
            or self.lora_dropout != 0
            or self.lora_target != "all-linear"
        ):
            # Most likely a forgotten lora_r: silently training every weight would be worse.
            raise DemError(
                "lora_alpha, lora_dropout and lora_target need lora_r > 0 (LoRA); "
                "lora_r=0 is full fine-tuning"
            )

    def lora(self) -> dict | None:
        """The LoRA record (alpha resolved), or None for full fine-tuning (or lora_r unset)."""
        if not self.lora_r:
            return None
        return {
            "r": self.lora_r,
            "alpha": float(self.lora_alpha or 2 * self.lora_r),
            "dropout": float(self.lora_dropout),
            "target": self.lora_target,
        }

    def parameters(self) -> dict:
        """What the run records of these settings: what changes the weights it produces."""
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["recorded"]}
        params["save_every"] = self.save_every or self.eval_every
        params.update({f"lora_{k}": v for k, v in (self.lora() or {}).items()})
        return params


# A notebook names every fine-tuning setting as the field does, except these two (its
# ``batch_size``, ``max_length``, ``seed``, ... are the fine-tune's).
FinetuneSettings.NOTEBOOK_NAMES = {
    "finetune_steps": "steps",
    "learning_rate": "lr",
    **{name: name for name in FinetuneSettings.names()},
}


# ----------------------------------------------------------------------------------------------
# Pretraining the tiny base
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainSettings(Settings):
    """How the tiny base is built: its shape and its generic-text pretraining."""

    steps: int = setting(600, "optimizer steps", check=positive_int)
    batch_size: int = setting(16, "sequences per step", check=positive_int)
    seq_len: int = setting(128, "tokens per sequence (packed text, no padding)", check=positive_int)
    # 1e-3, not 3e-3: on a pure copy task (repeated random words) the 4-layer tiny model made
    # no progress in 1000 steps at 3e-3 and learnt to copy by step ~350 at 1e-3.
    lr: float = setting(1e-3, "peak AdamW learning rate (cosine decay)")
    warmup_steps: int = setting(30, "linear warmup steps")
    seed: int = setting(0, "seed of initialisation, text and order")
    corpus: str = setting(
        "generic",
        "pretraining text: generic (prose only: the base knows no skill, the from-scratch "
        "contrast) or knowledge (prose, the sources' knowledge in raw form and requests in "
        "other words: the faithful regime's base, see dem/sources/knowledge.py)",
        check=_corpus,
        recorded=False,  # recorded by parameters() only when not generic, see there
    )
    hidden_size: int = setting(128, "model width")
    num_layers: int = setting(4, "transformer layers")
    num_heads: int = setting(4, "attention heads")
    intermediate_size: int | None = setting(None, "MLP width (unset: 2 x hidden_size)")
    max_position_embeddings: int = setting(256, "longest sequence the model can read")
    eval_every: int = setting(
        100, "validation loss (and a checkpoint) every N steps", check=positive_int
    )
    device: str = setting(
        "auto", "auto, cpu, cuda, mps (auto: cuda, then mps, then cpu)", recorded=False
    )

    # Fixed for pretraining (not settings, so not recorded): no accumulation, nanoGPT's weight
    # decay, clipping at 1, a checkpoint at every evaluation.
    grad_accum: ClassVar[int] = 1
    weight_decay: ClassVar[float] = 0.1
    max_grad_norm: ClassVar[float] = 1.0
    save_every: ClassVar[None] = None
    dtype: ClassVar[str] = "auto"  # a tiny base: float32 on CPUs, bf16 on GPUs (dem.precision)
    # Notebooks share batch_size, learning_rate, ... with fine-tuning, so only these are read.
    NOTEBOOK_NAMES: ClassVar[Mapping[str, str]] = {
        "pretrain_steps": "steps",
        "pretrain_corpus": "corpus",
        "seed": "seed",
        "device": "device",
    }

    def _check_together(self) -> None:
        if self.seq_len > self.max_position_embeddings:
            raise DemError(
                f"seq_len={self.seq_len} exceeds "
                f"max_position_embeddings={self.max_position_embeddings}"
            )

    def parameters(self, corpus_version: int) -> dict:
        """What the run records: the settings and the version of the generated corpus."""
        params = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["recorded"]}
        params["intermediate_size"] = self.intermediate_size or 2 * self.hidden_size
        # Like LoRA for fine-tunes: the generic corpus is what bases were always built from, so
        # it is left out and their records (and cached runs) stay as they were.
        if self.corpus != "generic":
            params["corpus"] = self.corpus
        return {"corpus_version": corpus_version, **params}
