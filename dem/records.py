"""What a chapter hands to the chapters after it, as typed records and declared tables.

Each record is a dataclass saved as JSON in the run folder's ``tables/`` (the file named by
``TABLE``); a later chapter reads it back with :meth:`load` and uses its fields by name, never a
row's position or a label's spelling. Tables of scores and costs stay CSV files with one row per
model (:data:`dem.layout.TABLES` lists them); :data:`SCHEMAS` declares the columns a later
chapter reads from each, :func:`read_table` checks them, and the records say what the rows are.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import pandas as pd

from dem import DemError
from dem.io import write_json
from dem.layout import RunLayout


class Record:
    """Saving and loading shared by the records."""

    TABLE: ClassVar[str]
    WRITER: ClassVar[str]  # the chapter that writes it, for the error when it is missing

    def save(self, layout: RunLayout) -> None:
        write_json(layout.table(self.TABLE), asdict(self))

    @classmethod
    def load(cls, layout: RunLayout):
        path = layout.table(cls.TABLE)
        if not path.is_file():
            raise DemError(f"{path} is missing: run chapter {cls.WRITER} first")
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(data))
        if missing:
            raise DemError(f"{path} has no {', '.join(missing)}: rerun chapter {cls.WRITER}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class MergeRecord(Record):
    """Chapter 04: DEM's weights, the baselines' λs, and what each weight search cost."""

    TABLE: ClassVar[str] = "04_merge_settings"
    WRITER: ClassVar[str] = "04"

    dem_weights: dict[str, float]  # the grid's choice, one weight per source
    lambdas: dict[str, float]  # the λ chosen on validation for each baseline with one
    search: dict  # the grid search's cost: candidates, wall_s, merge_overhead
    strategy: str
    metric: str
    ties_density: float
    dare_drop_prob: float
    more_merges: list[str]
    # every search beyond the grid (gradient, per layer, AdaMerging, TPE, the ensemble):
    # its cost, its chosen weights and, for the ensemble, its forward passes per token
    searches: dict[str, dict] = field(default_factory=dict)


@dataclass
class DMixRecord(Record):
    """Chapter 05: the data-mixing runs by label, and which of them each DMix method is."""

    TABLE: ClassVar[str] = "05_dmix"
    WRITER: ClassVar[str] = "05"

    runs: dict[str, dict[str, float]]  # label -> mixture {source: ratio}, the ratio search
    uniform: str  # the run with equal ratios: DMix at DEM's budget
    best: str  # the run chosen on validation: the ratio search's result
    guided: str | None = None  # the run at the ratio DEM's weights imply (None: not run)


def uniform_run(runs: dict[str, dict[str, float]]) -> str:
    """The label of the run whose ratios are all equal: DMix uniform, the baseline at DEM's
    budget; refused when the ratio grid has none."""
    equal = [label for label, mixture in runs.items() if len(set(mixture.values())) == 1]
    if not equal:
        raise DemError(
            "dmix_grid has no uniform ratio (all equal, e.g. [1, 1, 1, 1]): DMix uniform is "
            "the baseline at DEM's budget"
        )
    return equal[0]


# The CSV tables a later chapter reads: (the chapter writing it, the columns read by name).
# Scores are long (one row per model, source and metric); costs are indexed by the model's label.
SCORES = ("model", "source", "metric", "value")
COSTS = ("train_tokens", "wall_s")
SCHEMAS = {
    "02_individual_test": ("02", SCORES),
    "02_finetune_costs": ("02", COSTS),
    "03_relative_norms": ("03", ("source", "relative")),
    "03_barriers": ("03", ("pair", "barrier")),
    "03_merge_gaps": ("03", ("pair", "gap")),
    "04_merge_test": ("04", SCORES),
    "05_dmix_test": ("05", SCORES),
    "05_dmix_costs": ("05", COSTS),
    "05_dmix_dem_guided_cost": ("05", COSTS),
}


def read_table(layout: RunLayout, name: str, *, optional: bool = False) -> pd.DataFrame | None:
    """A declared table of the run, its columns checked against :data:`SCHEMAS` (a cost table
    indexed by its first column). ``optional``: None when the chapter skipped it (chapter 03's
    paths when ``path_points`` is empty)."""
    writer, columns = SCHEMAS[name]
    path = layout.table(name)
    if not path.is_file():
        if optional:
            return None
        raise DemError(f"{path} is missing: run chapter {writer} first")
    table = pd.read_csv(path, index_col=0 if columns == COSTS else None)
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DemError(f"{path} has no column {', '.join(missing)}: rerun chapter {writer}")
    return table
