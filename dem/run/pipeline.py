"""``dem run``: execute the tutorial notebooks in order with papermill into a run folder.

A run folder holds everything one execution produced: the executed notebooks, ``figures/``,
``models/``, ``vectors/``, ``tables/``, ``metrics.json`` and ``manifest.json`` (parameters,
versions, git commit, hardware, seed and wall time per step). Each step is keyed by a hash of
its notebook, the parameters it receives and the key of the step before it, so rerunning into
the same folder skips the finished steps whose inputs did not change and reruns the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from dem import DemError, resources
from dem.config_files import load_config
from dem.io import write_json
from dem.layout import RunLayout
from dem.provenance import ALLOW_MIX_ENV, check_same_machine, machine, provenance
from dem.run.execute import run_notebook

NOTEBOOKS = resources.NOTEBOOKS
PARAMS = resources.PARAMS


def chapter_of(notebook: Path) -> str:
    """A chapter's number from its notebook's name (``04_weighted_merging.ipynb`` -> ``"04"``)."""
    return notebook.name[:2]


def resolve_params(name: str | Path | None) -> Path:
    """A parameter file: a path, or the name of a shipped set (``smoke`` -> params/smoke.yaml)."""
    if not name:
        return PARAMS / "default.yaml"
    path = Path(name)
    shipped = PARAMS / f"{name}.yaml"
    known = shipped in resources.run_parameter_sets()
    if not path.exists() and path.suffix == "" and len(path.parts) == 1 and known:
        return shipped
    return path


def notebooks(folder: Path = NOTEBOOKS) -> list[Path]:
    """dem run's chapters in ``folder``, in order (not the sweep's chapter)."""
    found = [
        p
        for p in sorted(folder.glob("[0-9][0-9]_*.ipynb"))
        if p.name != resources.SWEEP_CHAPTER.name
    ]
    if not found:
        raise DemError(f"no notebooks (NN_name.ipynb) found in {folder}")
    return found


def _select(books: list[Path], only: str | None, start: str | None) -> list[Path]:
    """The notebooks to execute: all, the one named by ``only``, or ``start`` and later."""
    if only and start:
        raise DemError("give --only or --from, not both")
    wanted = only or start
    if not wanted:
        return books
    match = [
        i for i, nb in enumerate(books) if nb.stem == wanted or nb.stem.split("_")[0] == wanted
    ]
    if not match:
        known = ", ".join(nb.stem for nb in books)
        raise DemError(f"no chapter {wanted!r}; chapters: {known}")
    return books[match[0] : match[0] + 1] if only else books[match[0] :]


def chapters(folder: Path = NOTEBOOKS) -> list[tuple[str, str]]:
    """(name, title) of each chapter: the first heading of its first cell."""
    rows = []
    for nb in notebooks(folder):
        cells = json.loads(nb.read_text())["cells"]
        title = "".join(cells[0]["source"]).splitlines()[0].lstrip("# ") if cells else ""
        rows.append((nb.stem, title))
    return rows


def parameter_sets(folder: Path = PARAMS) -> list[tuple[str, str]]:
    """(name, first comment line) of each shipped parameter set."""
    rows = []
    for path in resources.run_parameter_sets(folder):
        first = path.read_text().splitlines()[:1]
        rows.append(
            (path.stem, first[0].lstrip("# ") if first and first[0].startswith("#") else "")
        )
    return rows


def _step_key(notebook: Path, parameters: dict, previous: str) -> str:
    digest = hashlib.sha256(notebook.read_bytes())
    digest.update(json.dumps(parameters, sort_keys=True, default=str).encode())
    digest.update(previous.encode())
    return digest.hexdigest()


def run(
    params_file: str | Path | None = None,
    out: str | Path | None = None,
    *,
    force: bool = False,
    overrides: dict | None = None,
    notebook_dir: str | Path = NOTEBOOKS,
    only: str | None = None,
    start: str | None = None,
    quiet: bool = False,
    allow_mix: bool = False,
    log=print,
) -> Path:
    """Execute every notebook in order into ``out``; return the run folder.

    ``only="04"`` reruns chapter 04 alone and ``start="04"`` chapter 04 and every later one,
    whether or not they changed; the chapters before must already be finished in ``out`` with
    the same notebooks and parameters (they are reused, never silently recomputed).
    ``quiet``: only one line per chapter, no section lines and no progress bars (CI logs).
    Reusing chapters (or resuming a fine-tune) from another torch version, device, dtype or
    thread count is refused unless ``allow_mix``.
    """
    params_file = resolve_params(params_file)
    if not params_file.is_file():
        known = ", ".join(p.stem for p in resources.run_parameter_sets())
        raise DemError(f"parameter file {params_file} not found (shipped sets: {known})")
    # Every setting is checked before anything is written.
    config = load_config(params_file, overrides)
    run_dir = (Path(out) if out else Path("runs") / params_file.stem).resolve()
    layout = RunLayout(run_dir)
    previous, here = _previous_run(layout, config, force=force, allow_mix=allow_mix)
    done = {} if force else previous.get("steps", {})
    books = notebooks(Path(notebook_dir))
    selected = _select(books, only, start)
    step_params, keys, finished = _steps(books, selected, config, layout, done, only, start)
    manifest = _manifest(params_file, config)
    manifest["machine"] = here
    if previous.get("machine") not in (None, here) and done:
        manifest["resumed_from_machine"] = previous["machine"]
    layout.notebooks.mkdir(parents=True, exist_ok=True)
    for nb in books:
        step, first = nb.stem, books.index(selected[0])
        if nb not in selected:  # before --only/--from: reused; after an --only chapter: as it was
            reused = books.index(nb) < first
            if reused:
                log(f"[dem run] {step}: reused")
            manifest["steps"][step] = (
                {**done[step], "skipped": True} if reused else done.get(step, {"key": None})
            )
        elif finished[nb] and not (only or start):
            log(f"[dem run] {step}: unchanged, skipped")
            manifest["steps"][step] = {**done[step], "skipped": True}
        else:
            _execute(nb, step_params[nb], keys[nb], layout, manifest, log=log, quiet=quiet)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(layout.manifest, manifest)
    return run_dir


def _previous_run(layout: RunLayout, config, *, force: bool, allow_mix: bool) -> tuple:
    """The run folder's previous manifest and this machine; refuses a folder holding someone
    else's files, and reusing finished chapters computed on another machine."""
    run_dir = layout.root
    if run_dir.exists() and any(run_dir.iterdir()) and not layout.manifest.exists() and not force:
        raise DemError(
            f"output folder {run_dir} exists and is not a dem run folder; "
            "choose another --out or pass --force"
        )
    previous = json.loads(layout.manifest.read_text()) if layout.manifest.exists() else {}
    here = chapters_machine(config)
    if allow_mix:  # the chapters' kernels inherit it: a fine-tune they resume may mix too
        os.environ[ALLOW_MIX_ENV] = "1"
    if previous.get("steps") and not force:
        check_same_machine(previous.get("machine"), here, f"run {run_dir}", allow_mix)
    return previous, here


def chapters_machine(config) -> dict:
    """The torch, device, dtype and threads the chapters will run with (dem.chapters.notebook.setup)."""
    from dem import models, precision

    device = models.pick_device(config.device)
    large = precision.base_is_large(config.base_model)
    dtype = precision.dtype_name(precision.pick_dtype(device, config.dtype, large=large))
    return machine(device.type, dtype, models.default_cpu_threads(large_model=large))


def _steps(books, selected, config, layout: RunLayout, done: dict, only, start) -> tuple:
    """Each chapter's parameters and key, and whether it finished; refuses --only/--from when a
    chapter they would reuse has not finished with these notebooks and parameters."""
    # Every step's key first: a chapter --only/--from would reuse must be checked before
    # anything is written. Each chapter gets every setting it declares, not only the file's.
    keys, key, step_params = {}, "", {}
    for nb in books:
        step_params[nb] = {**config.to_dict(chapter_of(nb)), "run_dir": str(layout.root)}
        key = keys[nb] = _step_key(nb, step_params[nb], key)
    finished = {
        nb: done.get(nb.stem, {}).get("key") == keys[nb]
        and layout.executed_notebook(nb.name).exists()
        for nb in books
    }
    for nb in books[: books.index(selected[0])]:
        if not finished[nb]:
            flag = f"--only {only}" if only else f"--from {start}"
            raise DemError(
                f"{flag} reuses the earlier chapters, but {nb.stem} has not finished in "
                f"{layout.root} with these notebooks and parameters; run without {flag} first"
            )
    return step_params, keys, finished


def _manifest(params_file: Path, config) -> dict:
    """The run's record: every setting, what the file changed, provenance; steps to come."""
    # MPLBACKEND=agg: figures render to files in a headless kernel (no display here).
    os.environ.setdefault("MPLBACKEND", "agg")
    # Per-file "Loading weights" bars would bury the notebooks' own output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    params = config.to_dict()
    params.pop("run_dir")
    # provenance(): versions, git {commit, dirty}, hardware, command, time (UTC).
    return {
        "params_file": str(params_file.resolve()),
        "parameters": params,
        "changed_from_default": config.changes(),
        "seed": params.get("seed"),
        **provenance(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "steps": {},
    }


def _execute(nb: Path, params: dict, key: str, layout: RunLayout, manifest: dict, *, log, quiet):
    """Execute one chapter into the run folder and record it (a failure in one line)."""
    import papermill as pm

    step, executed = nb.stem, layout.executed_notebook(nb.name)
    log(f"[dem run] {step}: running")
    t0 = time.perf_counter()
    try:
        run_notebook(nb, executed, params, layout.root, log=log, quiet=quiet)
    except pm.PapermillExecutionError as err:
        manifest["steps"][step] = {"key": None, "failed": True}
        write_json(layout.manifest, manifest)
        message = str(err.evalue).strip().splitlines()
        first_line = (err.source or "").strip().splitlines()[:1]
        raise DemError(
            f"notebook {nb.name} failed in cell [{err.exec_count}]"
            f"{f' ({first_line[0][:60]})' if first_line else ''}: {err.ename}: "
            f"{message[0] if message else ''} (partly executed notebook kept at {executed})"
        ) from None
    wall = time.perf_counter() - t0
    manifest["steps"][step] = {"key": key, "wall_s": round(wall, 2)}
    write_json(layout.manifest, manifest)
    log(f"[dem run] {step}: done in {wall:.1f} s")
