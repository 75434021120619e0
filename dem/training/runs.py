"""Run folders: the "same run?" decision, the training record, and finishing a run.

A run is built in ``<out>.partial/`` and renamed to ``<out>/`` only when complete, so a
finished folder is always an ordinary Hugging Face model folder (with its model card,
``README.md``) plus ``train_log.csv``, ``cost.json`` and ``dem_train.json`` (the record:
parameters and provenance). The record's ``parameters`` decide what a folder holds: the same
parameters are the same run (a finished one is reused, an unfinished one resumed), other
parameters are another run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dem import DemError
from dem.io import write_json, write_text
from dem.model_card import write_card
from dem.provenance import check_same_machine, machine, provenance

CHECKPOINT = "checkpoint"  # the subfolder of <out>.partial an interrupted run resumes from
RECORD = "dem_train.json"
KEPT_WEIGHTS = "trained.safetensors"  # the weights of a run whose save failed
LOG_COLUMNS = (
    "step",
    "loss",
    "val_loss",
    "tokens",
    "wall_s",
    "tokens_per_s",
    "lr",
    "response_tokens",
)


def fingerprint(base: str | Path) -> str | None:
    """sha256 over a local base's weight files, so retraining a changed base is not a resume."""
    folder = Path(base)
    if not folder.is_dir():
        return None  # a hub id: the id itself is recorded
    digest = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.gguf")):
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def write_record(path: Path, data: Any) -> None:
    """A run's JSON files (record, cost, checkpoint state): sorted keys, written atomically."""
    write_json(path, data, sort_keys=True)


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None


def run_machine(accelerator: Any, dtype: str) -> dict:
    """This process's machine as a run records it (threads: set by the caller beforehand);
    ``dtype``: the settings' (auto resolved as the training loop resolves it)."""
    import torch

    from dem.precision import dtype_name, pick_dtype

    dtype = dtype_name(pick_dtype(accelerator.device, dtype))
    return machine(accelerator.device.type, dtype, torch.get_num_threads())


def training_record(kind: str, params: dict, accelerator: Any, dtype: str) -> dict:
    """What ``dem_train.json`` holds: the run's parameters, machine and provenance."""
    import torch

    record = {"kind": kind, "parameters": params, "machine": run_machine(accelerator, dtype)}
    record.update(provenance())
    # Kept from before the shared provenance record, for readers of older runs.
    record["git_commit"] = record["git"]["commit"]
    record["cpu_threads"] = torch.get_num_threads()
    return record


def prepare_run(
    out: Path,
    params: dict,
    overwrite: bool,
    replace: bool = False,
    this_machine: dict | None = None,
    allow_mix: bool = False,
) -> tuple[Path, dict | None]:
    """Decide what to do with ``out``; return (working folder, cost of a finished same run).

    Finished same run: nothing to do (the cached cost comes back). Unfinished same run in
    ``<out>.partial``: resume it. A dem run with other parameters: replace it if ``replace``
    (``dem run`` reruns a step whose parameters changed). Anything else in the way: refuse
    unless ``overwrite``. Resuming a checkpoint written on a machine other than
    ``this_machine`` (torch, device, dtype, threads) is refused unless ``allow_mix``.
    """
    partial = out.with_name(out.name + ".partial")
    for folder in (out, partial):
        if overwrite and folder.exists():
            shutil.rmtree(folder)
        elif replace and folder.exists():
            record = read_record(folder)
            if record is not None and record.get("parameters") != params:
                shutil.rmtree(folder)
    if out.exists():
        record = read_record(out)
        if record is None:
            raise DemError(
                f"output folder {out} exists and is not a dem training run; "
                "choose another folder or pass overwrite=True"
            )
        if record.get("parameters") != params:
            changed = changed_keys(record.get("parameters") or {}, params)
            raise DemError(
                f"output folder {out} holds a different run (parameters differ: "
                f"{', '.join(changed)}); choose another folder or pass overwrite=True"
            )
        cost_file = out / "cost.json"
        if cost_file.is_file():
            return out, json.loads(cost_file.read_text())
        raise DemError(f"output folder {out} has no cost.json; pass overwrite=True to redo it")
    if partial.exists():
        record = read_record(partial)
        if record is not None and record.get("parameters") != params:
            changed = changed_keys(record.get("parameters") or {}, params)
            raise DemError(
                f"unfinished run {partial} has different parameters ({', '.join(changed)}); "
                "pass overwrite=True to discard it"
            )
        if record is not None and this_machine is not None and (partial / CHECKPOINT).exists():
            what = f"unfinished run {partial}"
            check_same_machine(record.get("machine"), this_machine, what, allow_mix)
    partial.mkdir(parents=True, exist_ok=True)
    return partial, None


def prepare_synced(
    accelerator: Any,
    out: Path,
    params: dict,
    overwrite: bool,
    replace: bool = False,
    allow_mix: bool = False,
    *,
    dtype: str,
) -> tuple[Path, dict | None]:
    """:func:`prepare_run` on the main process first (it may delete), then on the others."""
    here = run_machine(accelerator, dtype)
    if accelerator.is_main_process:
        prepared = prepare_run(out, params, overwrite, replace, here, allow_mix)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        prepared = prepare_run(out, params, False, this_machine=here, allow_mix=allow_mix)
    return prepared


def changed_keys(old: Mapping, new: Mapping) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)] or ["(record unreadable)"]


def start_run(accelerator: Any, work: Path, record: dict) -> None:
    """Mark ``work`` as a run in progress (its record, status running)."""
    if accelerator.is_main_process:
        before = (read_record(work) or {}).get("machine")
        if before and before != record["machine"]:  # resumed with allow_mix: the record says so
            record["resumed_from_machine"] = before
        write_record(work / RECORD, {**record, "status": "running"})


@contextmanager
def discard_if_untrained(accelerator: Any, work: Path) -> Iterator[None]:
    """A user error (a base without weights, a malformed source line) before the first
    checkpoint leaves no run folder behind: a corrected rerun, with other parameters, would
    otherwise be refused by the unfinished one."""
    try:
        yield
    except DemError:
        if accelerator.is_main_process and not (work / CHECKPOINT).exists():
            shutil.rmtree(work, ignore_errors=True)
        raise


def write_log(path: Path, log: list[dict]) -> None:
    """The per-step log as CSV: the fixed columns first, then any per-source ones."""
    columns = list(LOG_COLUMNS)
    for row in log:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in log:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    write_text(path, buffer.getvalue())


def complete(result: dict, tokenizer: Any, work: Path, out: Path, record: dict) -> dict:
    """Write the model, log, cost and record into ``work`` and rename it to ``out``."""
    log, model, main = result.pop("_log"), result.pop("_model"), result.pop("_main")
    if main:
        _save_or_keep_weights(model, work)
        tokenizer.save_pretrained(work)
        write_log(work / "train_log.csv", log)
        final_val = next(
            (r["val_loss"] for r in reversed(log) if r.get("val_loss") is not None), None
        )
        result["final_val_loss"] = final_val
        write_record(work / "cost.json", result)
        write_record(work / RECORD, {**record, "status": "finished"})
        write_card(work)  # README.md from the records just written, before the rename
        finish_run(work, out)
    return result


def _save_or_keep_weights(model: Any, work: Path) -> None:
    """``model.save_pretrained(work)``; should it fail (a bug, a full disk), the trained weights
    are first kept beside the checkpoint, where the error's traceback is followed by their path."""
    try:
        model.save_pretrained(work)  # safetensors; the folder is renamed whole when done
    except Exception:
        import sys

        from safetensors.torch import save_model

        kept = work / KEPT_WEIGHTS
        save_model(model, str(kept))  # handles tied weights, as save_pretrained does
        print(f"saving the trained model failed; its weights are kept in {kept}", file=sys.stderr)
        raise


def finish_run(work: Path, out: Path) -> None:
    """Rename the completed working folder to ``out`` (the last step of a run).

    A plain rename, not :func:`dem.io.atomic_output_dir`: ``<out>.partial`` must survive a
    crash so that the rerun resumes it. The checkpoint goes only after the rename: a crash in
    between leaves either a resumable ``.partial`` folder or a finished one, never a partial
    folder without its checkpoint.
    """
    os.replace(work, out)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
