"""``dem sweep``: the tutorial run over a grid of bases, budgets, fine-tuning kinds and seeds.

One sweep cell is one ordinary ``dem run`` (chapters 01-06 through :func:`dem.run.pipeline.run`)
into ``OUT/cells/<cell id>/`` with a few parameters overridden: the base, the per-source steps
times the budget, the fine-tuning kind (full or LoRA) and the seed. Every method is therefore
trained, chosen on validation data and scored on test data exactly as the tutorial does; the
sweep only reads what each cell's ``metrics.json`` and ``tables/`` hold. A finished cell is
skipped on a rerun; a half-finished one resumes at its first unfinished chapter.

The sweep file (YAML) is read into :class:`SweepConfig`, one typed field per setting, checked
before anything runs. ``OUT/results.csv`` has one row per cell × method, ``OUT/diagnostics.csv``
the vectors' sizes, cosines and merge gaps per cell; :mod:`dem.chapters.scale` analyses them (chapter 07).
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dem import DemError, resources
from dem.io import refuse_foreign_folder, write_json
from dem.provenance import provenance
from dem.run.sweep_config import (
    Base,
    Cell,
    SweepConfig,
    load_sweep,
    resolve_sweep,
    select_cells,
)
from dem.run.sweep_tables import folder_size, headline, write_tables

CHAPTER = resources.SWEEP_CHAPTER
DONE = "sweep_cell.json"  # written into a cell's run folder once its metrics.json exists


@dataclass
class PlannedCell:
    """A cell with its parameters, its training steps and what it is expected to cost."""

    cell: Cell
    params_file: Path
    overrides: dict  # the notebook parameters this cell changes: passed to dem.run.pipeline.run
    size: int  # the base's parameters (0: unknown before the cell runs)
    steps: int  # training steps of every run the cell trains (fine-tunes, DMix, swap)
    estimate_s: float = 0.0
    done: bool = False
    wall_s: float | None = None  # measured, once finished


def _settings(params_file: Path, overrides: dict, where: str) -> dict:
    """Every chapter parameter of a cell, checked as dem.run.pipeline.run will check them."""
    from dem.config import make_config
    from dem.config_files import load_config

    changes = load_config(params_file).changes()  # its errors name the parameter file
    return make_config({**changes, **overrides}, where=where).to_dict()


def cell_overrides(config: SweepConfig, cell: Cell, where: str) -> tuple[Path, dict, dict]:
    """(parameter file, overrides, every resulting setting) of one cell.

    The budget multiplies the per-source steps (``finetune_steps`` and each ``source_steps``,
    and ``dmix_steps`` when set); DMix keeps training the fine-tunes' total, so the budgets of
    DEM and DMix stay equal at every multiplier.
    """
    from dem.run.pipeline import resolve_params

    params_file = resolve_params(cell.base.params or config.params)
    if not params_file.is_file():
        raise DemError(f"{where}: parameter set {params_file} not found")
    fixed = {**config.overrides, **cell.base.overrides, "base_model": cell.base.base_model,
             **config.kinds[cell.kind], "seed": cell.seed}  # fmt: skip
    settings = _settings(params_file, fixed, where)
    scaled = {
        "finetune_steps": round(settings["finetune_steps"] * cell.budget),
        "source_steps": {k: round(v * cell.budget) for k, v in settings["source_steps"].items()},
    }
    if settings["dmix_steps"]:
        scaled["dmix_steps"] = round(settings["dmix_steps"] * cell.budget)
    overrides = {**fixed, **scaled}
    return params_file, overrides, _settings(params_file, overrides, where)


def training_steps(settings: dict) -> int:
    """Steps of every training run a cell does: K fine-tunes, the DMix grid, the swap's fine-tune."""
    per_source = [settings["source_steps"].get(s, settings["finetune_steps"])
                  for s in settings["sources"]]  # fmt: skip
    dmix = settings["dmix_steps"] or sum(per_source)
    swap = settings["finetune_steps"] if settings["swap_out"] else 0
    return sum(per_source) + dmix * len(settings["dmix_grid"]) + swap


def base_size(base: Base) -> int:
    """The base's parameters: its declared size, else counted in a local or shipped folder."""
    if base.size:
        return base.size
    from dem.models import shipped_base

    folder = Path(shipped_base(base.base_model))  # an unknown dem:NAME is refused here
    return folder_size(folder) if folder.is_dir() else 0


# The cost model of --plan: a training step costs in proportion to (parameters + SIZE_OFFSET),
# measured on one thread: pretraining steps took 0.068 s at 0.17M and 0.58 s at 2.65M
# parameters (data/bases), a ratio that fits 0.16M of per-step work independent of size.
REFERENCE_SIZE = 2_649_344  # dem:tiny-knowledge, the size seconds_per_step is quoted at
SIZE_OFFSET = 160_000
CELL_OVERHEAD_S = 60.0  # six kernel starts, data generation, tables: paid by every cell


def prior_seconds(config: SweepConfig, size: int, steps: int) -> float:
    """Expected wall seconds of a cell before any cell of this sweep has finished."""
    scale = ((size or REFERENCE_SIZE) + SIZE_OFFSET) / (REFERENCE_SIZE + SIZE_OFFSET)
    return CELL_OVERHEAD_S + config.seconds_per_step * steps * scale


def make_plan(config: SweepConfig, out: Path, where: str) -> list[PlannedCell]:
    """Every cell with its settings checked, its status in ``out`` and its estimated time.

    Estimates are the prior cost model scaled by (measured / predicted) over the cells that
    have finished in ``out``, so the plan learns this machine's speed.
    """
    sizes = {}
    for base in config.bases:
        try:
            sizes[base.name] = base_size(base)
        except DemError as err:
            raise DemError(f"{where}: bases: {base.name}: {err}") from None
    plan = []
    for cell in select_cells(config):
        params_file, overrides, settings = cell_overrides(config, cell, f"{where}: cell {cell.id}")
        planned = PlannedCell(cell, params_file, overrides, sizes[cell.base.name],
                              training_steps(settings))  # fmt: skip
        planned.estimate_s = prior_seconds(config, planned.size, planned.steps)
        record = finished_record(out / "cells" / cell.id)
        if record is not None and record["overrides"] == json.loads(json.dumps(overrides)):
            planned.done, planned.wall_s = True, record["wall_s"]
        plan.append(planned)
    calibrate(plan)
    return ordered(plan, config)


def calibrate(plan: list[PlannedCell]) -> None:
    """Replace the prior estimates by the measured times of the finished cells: a line
    wall = c0 + c1 · prior when finished cells of two costs or more give one with c0, c1 >= 0
    (a cell's fixed part, kernels and evaluation, is larger than the prior assumes on tiny
    bases), else the prior scaled by measured / predicted."""
    done = [p for p in plan if p.done]
    if not done:
        return
    prior = np.array([p.estimate_s for p in done])
    wall = np.array([p.wall_s for p in done])
    line = None
    if len(set(prior.round(3))) >= 2:
        line = np.linalg.lstsq(np.stack([np.ones_like(prior), prior], 1), wall, rcond=None)[0]
    for p in plan:
        if line is not None and (line >= 0).all():
            p.estimate_s = float(line[0] + line[1] * p.estimate_s)
        else:
            p.estimate_s *= wall.sum() / prior.sum()


def ordered(plan: list[PlannedCell], config: SweepConfig) -> list[PlannedCell]:
    """``curve``: the first budget and kind first, seed by seed, cheapest cell first within a
    seed (the curve over bases appears soonest, then its spread); then the other cells."""
    if config.order == "file":
        return plan
    main = (config.budgets[0], next(iter(config.kinds)))
    return sorted(
        plan, key=lambda p: ((p.cell.budget, p.cell.kind) != main, p.cell.seed, p.estimate_s)
    )


def finished_record(cell_dir: Path) -> dict | None:
    """A cell's done record, when the cell finished (its metrics.json beside it)."""
    record = cell_dir / DONE
    if not (record.is_file() and (cell_dir / "metrics.json").is_file()):
        return None
    return json.loads(record.read_text())


def pick(plan: list[PlannedCell], patterns: Sequence[str]) -> list[PlannedCell]:
    """The cells whose id matches one of the shell patterns (``h64-*``, ``*-s0``)."""
    if not patterns:
        return plan
    chosen = [p for p in plan if any(fnmatch.fnmatchcase(p.cell.id, pat) for pat in patterns)]
    if not chosen:
        ids = ", ".join(p.cell.id for p in plan)
        raise DemError(f"--only-cells {' '.join(patterns)} matches no cell (cells: {ids})")
    return chosen


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def plan_text(plan: list[PlannedCell]) -> str:
    """The plan as printed by ``dem sweep --plan``: one line per cell, then the totals."""
    lines = [f"{'#':>3}  {'cell':<28} {'params':>8} {'steps':>7}  {'estimate':>9}  status"]
    for i, p in enumerate(plan, 1):
        size = f"{p.size / 1e6:.2f}M" if p.size else "?"
        status = f"done in {_minutes(p.wall_s)}" if p.done else "to run"
        lines.append(f"{i:>3}  {p.cell.id:<28} {size:>8} {p.steps:>7,}  "
                     f"{_minutes(p.estimate_s):>9}  {status}")  # fmt: skip
    left = sum(p.estimate_s for p in plan if not p.done)
    n_left = sum(not p.done for p in plan)
    lines.append(f"{len(plan)} cells, {len(plan) - n_left} finished; "
                 f"{n_left} to run, about {_minutes(left)} ({left / 3600:.1f} h) on this machine")  # fmt: skip
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Running the cells
# ----------------------------------------------------------------------------------------------


def run_cell(planned: PlannedCell, out: Path, *, allow_mix: bool = False) -> dict:
    """Run the tutorial chapters for one cell (finished chapters are reused, and refused if
    begun on another machine unless ``allow_mix``); its done record."""
    from dem.run import pipeline

    cell_dir = out / "cells" / planned.cell.id
    log_file = out / "logs" / f"{planned.cell.id}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as stream:  # a log grows line by line; the tables are atomic

        def log(line: str) -> None:
            stream.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            stream.flush()

        pipeline.run(planned.params_file, cell_dir, overrides=planned.overrides, quiet=True,
                     allow_mix=allow_mix, log=log)  # fmt: skip
    steps = json.loads((cell_dir / "manifest.json").read_text())["steps"]
    record = {
        "cell": {**asdict(planned.cell), "id": planned.cell.id},
        "params_file": str(planned.params_file),
        "overrides": planned.overrides,
        "steps": planned.steps,
        # The chapters' own wall times: a resumed cell still counts the chapters run before.
        "wall_s": round(sum(s.get("wall_s", 0.0) for s in steps.values()), 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(cell_dir / DONE, record)
    return record


def run_sweep(
    sweep_file: str | Path,
    out: str | Path,
    *,
    plan_only: bool = False,
    only_cells: Sequence[str] = (),
    chapter: bool = True,
    refresh: bool = False,
    allow_mix: bool = False,
    log: Callable[[str], None] = print,
) -> list[PlannedCell]:
    """Plan the sweep, then run every unfinished selected cell, rewriting the tables after each.

    Everything is checked before anything is written: the sweep file, every cell's parameters
    and the ``only_cells`` patterns. ``chapter``: execute chapter 07 on the tables at the end.
    ``refresh``: pass finished cells through dem run too, which reruns only the chapters whose
    notebook or settings changed since (a new method in chapter 04 reaches every cell).
    ``allow_mix``: resume cells begun with another torch version, device, dtype or thread count.
    """
    path = resolve_sweep(sweep_file)
    config = load_sweep(path)
    out = Path(out).resolve()
    plan = make_plan(config, out, f"sweep file {path}")
    selected = pick(plan, only_cells)
    for p in selected if refresh and not plan_only else ():
        p.done = False
    if plan_only:
        log(plan_text(selected))
        return selected
    # A sweep writes its manifest.json first; a folder with files but without it is someone
    # else's, and nothing is written into it.
    ours = (out / "manifest.json").is_file()
    refuse_foreign_folder(out, lambda _name: ours, "a dem sweep folder (no manifest.json)")
    manifest_path = out / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest = {
        "sweep_file": str(path.resolve()),
        "params_file": str(path.resolve()),  # what dem publish names as the parameters
        "config": asdict(config),
        **provenance(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not any(not p.done for p in selected):  # the tables will not change: chapter 07 stands
        manifest.update({k: previous[k] for k in ("steps", "finished") if k in previous})
    write_json(manifest_path, manifest)
    _run_cells(selected, plan, config, out, log, allow_mix=allow_mix)
    write_tables(out, plan, [c.id for c in select_cells(config)])
    if chapter:
        manifest["steps"] = run_chapter(out, log)
        manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["cells"] = {p.cell.id: {"done": p.done, "wall_s": p.wall_s} for p in plan}
    write_json(manifest_path, manifest)
    return selected


def _run_cells(
    selected: list[PlannedCell],
    plan: list[PlannedCell],
    config: SweepConfig,
    out: Path,
    log,
    *,
    allow_mix: bool = False,
) -> None:
    """Run the unfinished selected cells, one progress line each; the tables after each."""
    for i, p in enumerate(selected, 1):
        head = f"[dem sweep] {i}/{len(selected)} {p.cell.id}"
        if p.done:
            log(f"{head}: finished earlier, skipped")
            continue
        log(f"{head}: running (about {_minutes(p.estimate_s)}; log: {out}/logs/{p.cell.id}.log)")
        p.wall_s, p.done = run_cell(p, out, allow_mix=allow_mix)["wall_s"], True
        results = write_tables(out, plan, [c.id for c in select_cells(config)])
        log(f"{head}: done in {_minutes(p.wall_s)}; {headline(results, p.cell.id)}")


def run_chapter(out: Path, log: Callable[[str], None]) -> dict:
    """Execute chapter 07 on the sweep's tables into ``out/notebooks/``; its wall time."""
    import papermill as pm

    from dem.run.execute import run_notebook

    executed = out / "notebooks" / CHAPTER.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    log(f"[dem sweep] {CHAPTER.stem}: running")
    t0 = time.perf_counter()
    try:
        run_notebook(CHAPTER, executed, {"run_dir": str(out)}, out, log=log, quiet=True)
    except pm.PapermillExecutionError as err:
        message = (str(err.evalue).strip().splitlines() or [""])[0]
        raise DemError(
            f"{CHAPTER.name} failed in cell [{err.exec_count}]: {err.ename}: "
            f"{message} (partly executed notebook kept at {executed})"
        ) from None
    wall = time.perf_counter() - t0
    log(f"[dem sweep] {CHAPTER.stem}: done in {wall:.1f} s")
    return {CHAPTER.stem: {"wall_s": round(wall, 2)}}
