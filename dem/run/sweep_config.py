"""A sweep file, read into :class:`SweepConfig` (one typed field per setting, checked before
anything runs), and the cells it selects."""

from __future__ import annotations

import json
import math
import typing
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dem import DemError, resources

ORDERS = ("curve", "file")


def _setting(default: Any, why: str, choices: Sequence[str] = ()) -> Any:
    factory = (
        (lambda: json.loads(json.dumps(default))) if isinstance(default, (list, dict)) else None
    )
    kwargs = {"default_factory": factory} if factory else {"default": default}
    return field(**kwargs, metadata={"why": why, "choices": tuple(choices)})


@dataclass(frozen=True)
class Base:
    """One base model of the sweep: a short name for tables, and how a cell loads it."""

    name: str = _setting(MISSING, "short label in cell ids and tables, e.g. h64")
    base_model: str = _setting(MISSING, "the chapters' base_model: dem:NAME, a folder or a hub id")
    params: str = _setting("", "parameter set for this base's cells ('' = the sweep's params)")
    overrides: dict = _setting({}, "notebook parameters only this base needs (e.g. gguf_file)")
    size: int = _setting(0, "parameters, for --plan only, where base_model is not a local folder")


@dataclass(frozen=True)
class CellRule:
    """A block of cells: the cross product of the listed values (an omitted axis: all values)."""

    bases: list = _setting([], "base names ([] = every base)")
    budgets: list = _setting([], "budget multipliers ([] = every budget)")
    kinds: list = _setting([], "fine-tuning kinds ([] = every kind)")
    seeds: list = _setting([], "seeds ([] = every seed)")


@dataclass(frozen=True)
class SweepConfig:
    """Everything a sweep file declares; each field's metadata says why it exists."""

    params: str = _setting(
        "default", "the shipped parameter set (or YAML file) every cell starts from"
    )
    overrides: dict = _setting({}, "notebook parameters common to every cell (e.g. swap_out: '')")
    bases: list = _setting([], "the bases, smallest first: Base entries {name, base_model, ...}")
    budgets: list = _setting([1], "multipliers of finetune_steps (and source_steps): 1 = budget S")
    kinds: dict = _setting({"full": {}}, "fine-tuning kind -> its notebook parameters (lora_r ...)")
    seeds: list = _setting([0], "seeds; each seeds data, initialisation and order within a cell")
    cells: list = _setting([], "CellRule blocks whose union is the sweep ([] = the whole grid)")
    order: str = _setting(
        "curve", "curve: main budget and kind first, seed by seed; file: as listed", ORDERS
    )
    seconds_per_step: float = _setting(
        0.3, "--plan's prior: seconds per training step of a 2.6M base, all chapters included"
    )

    def __post_init__(self) -> None:
        names = [b.name for b in self.bases]
        if not names:
            raise DemError("bases: at least one base is needed")
        if len(set(names)) != len(names):
            raise DemError(f"bases: names must be distinct, got {names}")
        for rule in self.cells:
            for axis, known in (("bases", names), ("budgets", self.budgets),
                                ("kinds", list(self.kinds)), ("seeds", self.seeds)):  # fmt: skip
                unknown = [v for v in getattr(rule, axis) if v not in known]
                if unknown:
                    raise DemError(f"cells: {axis} {unknown} not declared (declared: {known})")


def _check(where: str, value: Any, hint: Any, choices: Sequence[str]) -> Any:
    """``value`` if it has the type ``hint`` names (nested dataclasses built); else DemError."""
    expected = getattr(hint, "__name__", str(hint))
    if isinstance(hint, type) and hasattr(hint, "__dataclass_fields__"):
        if not isinstance(value, dict):
            raise DemError(f"{where}: expected a mapping ({expected}), got {value!r}")
        return _build(hint, value, where)
    if hint is float:
        ok = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise DemError(f"{where}: expected {expected}, got {value!r}")
    if choices and value not in choices:
        raise DemError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")
    return value


# The element type of each list field (dataclass fields are declared plainly, as list).
ITEMS = {
    (SweepConfig, "bases"): Base,
    (SweepConfig, "budgets"): float,
    (SweepConfig, "seeds"): int,
    (SweepConfig, "cells"): CellRule,
    (CellRule, "bases"): str,
    (CellRule, "budgets"): float,
    (CellRule, "kinds"): str,
    (CellRule, "seeds"): int,
}


def _build(cls: type, data: dict, where: str) -> Any:
    """``cls(**data)`` with every key known and every value of its declared type."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise DemError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key, f = f"{where}: {name}", known[name]
        value = _check(key, value, hints[name], f.metadata["choices"])
        item = ITEMS.get((cls, name))
        if item is not None:
            value = [_check(f"{key}[{i}]", v, item, ()) for i, v in enumerate(value)]
        if (cls, name) == (SweepConfig, "kinds"):
            value = {k: _check(f"{key}.{k}", v or {}, dict, ()) for k, v in value.items()}
        values[name] = value
    missing = [n for n, f in known.items() if n not in data and f.default is MISSING
               and f.default_factory is MISSING]  # fmt: skip
    if missing:
        raise DemError(f"{where}: missing key {missing[0]!r}")
    try:
        return cls(**values)
    except DemError as err:
        raise DemError(f"{where}: {err}") from None


def resolve_sweep(name: str | Path) -> Path:
    """A sweep file: a path, or the name of a shipped sweep (``sweep-smoke`` ->
    params/sweep-smoke.yaml)."""
    path, shipped = Path(name), resources.PARAMS / f"{name}.yaml"
    known = shipped in resources.sweep_files()
    if not path.exists() and path.suffix == "" and len(path.parts) == 1 and known:
        return shipped
    return path


def load_sweep(name: str | Path) -> SweepConfig:
    """Read and check a sweep file; any problem is one DemError naming file, key and expectation."""
    path = resolve_sweep(name)
    if not path.is_file():
        known = ", ".join(p.stem for p in resources.sweep_files())
        raise DemError(f"sweep file {path} not found (shipped sweeps: {known})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DemError(f"sweep file {path} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise DemError(f"sweep file {path}: expected a mapping of setting: value")
    return _build(SweepConfig, data, f"sweep file {path}")


# ----------------------------------------------------------------------------------------------
# Cells and the plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One run of the tutorial: a base, a budget multiplier, a fine-tuning kind and a seed."""

    base: Base
    budget: float
    kind: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.base.name}-x{self.budget:g}-{self.kind}-s{self.seed}"


def select_cells(config: SweepConfig) -> list[Cell]:
    """The union of the ``cells`` blocks (each a cross product), each cell once, file order."""
    bases = {b.name: b for b in config.bases}
    found: dict[str, Cell] = {}
    for rule in config.cells or [CellRule()]:
        for name in rule.bases or list(bases):
            for budget in rule.budgets or config.budgets:
                for kind in rule.kinds or list(config.kinds):
                    for seed in rule.seeds or config.seeds:
                        cell = Cell(bases[name], budget, kind, seed)
                        found.setdefault(cell.id, cell)
    return list(found.values())
