"""Model cards: the ``README.md`` with Hugging Face front matter in every model folder dem writes.

The card is rendered from the records already in the folder (``dem_train.json`` with
``cost.json`` and ``train_log.csv`` for a training run, ``dem_merge.json`` for a merge,
``dem_base.json`` for a base dem converted to safetensors), so it
says nothing the records do not: the front matter (``base_model``, ``base_model_relation``,
``library_name``, ``tags``, ``license`` inherited from the base where known) for the Hub and
for tools that read model trees, and a body stating the recipe -- sources and mixture or merge
weights, method and parameters, training budget, commit -- and the scores known so far.
Training and merging write it inside the unfinished folder, before that is renamed into place;
:func:`write_card` with ``scores`` rewrites it (atomically) once a run has measured them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dem.io import write_text
from dem.layout import MERGE_RECORD

CARD = "README.md"
# dem.training.runs.RECORD, which writes cards through this module (importing it: a cycle)
TRAIN_RECORD = "dem_train.json"
BASE_RECORD = "dem_base.json"  # a base dem converted (dem.models / dem.bases prepare_base)
PAPER = "[DEM](https://arxiv.org/abs/2406.15570) (Ram et al., EMNLP 2024)"


def write_card(folder: str | Path, scores: Mapping[str, float] | None = None) -> Path:
    """Write ``folder/README.md`` from the folder's dem records; return its path.

    ``scores`` (name -> value, e.g. ``{"arithmetic accuracy": 0.61}``) are listed beside the
    validation losses training recorded.
    """
    folder = Path(folder)
    if (folder / MERGE_RECORD).is_file():
        card = merge_card(_read_json(folder / MERGE_RECORD), scores)
    elif (folder / BASE_RECORD).is_file():
        card = base_card(_read_json(folder / BASE_RECORD))
    elif (folder / TRAIN_RECORD).is_file():
        record = _read_json(folder / TRAIN_RECORD)
        cost = _read_json(folder / "cost.json") if (folder / "cost.json").is_file() else {}
        card = training_card(record, cost, _final_losses(folder / "train_log.csv"), scores)
    else:
        raise FileNotFoundError(f"{folder} has no {MERGE_RECORD}, {BASE_RECORD} or {TRAIN_RECORD}")
    return write_text(folder / CARD, str(card))


def read_card(folder: str | Path) -> Any:
    """The folder's card as a ``huggingface_hub.ModelCard`` (``.data`` is the front matter)."""
    from huggingface_hub import ModelCard

    return ModelCard.load(Path(folder) / CARD)


def _card(front_matter: dict, body: str) -> Any:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(**{k: v for k, v in front_matter.items() if v is not None})
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# ----------------------------------------------------------------------------------------------
# Training runs: fine-tunes, DMix runs, pretraining
# ----------------------------------------------------------------------------------------------


def training_card(
    record: dict, cost: dict, losses: Mapping[str, float], scores: Mapping[str, float] | None
) -> Any:
    """The card of a fine-tune, DMix run or pretraining from its record and cost."""
    p = record.get("parameters", {})
    mixture = p.get("mixture") or {}
    kind = _training_kind(record.get("kind"), mixture)
    lora = {k.removeprefix("lora_"): v for k, v in p.items() if k.startswith("lora_")}
    base = model_name(p["base"]) if p.get("base") else None
    tags = ["dem", "fine-tuned" if base else "pretrained", *(["dmix"] if kind == "DMix" else [])]
    front = {
        "base_model": base,
        "base_model_relation": "finetune" if base else None,
        "library_name": "transformers",
        "license": base_license(p["base"]) if base else None,
        "tags": tags + (["lora"] if lora else []),
    }
    rows = [("kind", kind)]
    if base:
        rows.append(("base model", f"`{base}`"))
    if mixture:
        rows.append(("sources (mixture ratio)", _mixture(mixture)))
    if p.get("source_kwargs"):
        rows.append(("source options", _inline(p["source_kwargs"])))
    rows.append(("method", _training_method(lora)))
    rows += _budget_rows(p, cost)
    rows += _provenance_rows(record)
    title = f"{kind} of `{base}`" if base else "A base pretrained from scratch"
    what = {
        "Fine-tune": "fine-tuned on one data source: one θ_i of a DEM merge",
        "DMix": "fine-tuned on a mixture of data sources (DMix, the paper's baseline)",
        "Pretraining": "pretrained from scratch on generated text",
    }[kind]
    intro = (
        f"A model {what}, trained with dem, the reproducible implementation of {PAPER}. "
        "The full record is `dem_train.json` (parameters and provenance), `cost.json` "
        "(budget) and `train_log.csv` (every step's loss) beside this card; the validation "
        "losses below are the last ones training measured."
    )
    body = _body(title, intro, rows, {**losses, **(scores or {})}, record.get("command"))
    return _card(front, body)


def _training_kind(kind: str | None, mixture: Mapping[str, float]) -> str:
    if kind == "pretrain":
        return "Pretraining"
    return "DMix" if len(mixture) > 1 else "Fine-tune"


def _training_method(lora: Mapping[str, Any]) -> str:
    if not lora:
        return "full fine-tuning (every weight), AdamW, linear warmup then cosine decay"
    return (
        f"LoRA ({_inline(lora)}), merged into the weights; the adapter is in `adapter/`; "
        "AdamW, linear warmup then cosine decay"
    )


def _budget_rows(p: Mapping[str, Any], cost: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Steps, batch, learning rate and what the run consumed."""
    per_step = p.get("batch_size", "?")
    if p.get("grad_accum", 1) != 1 or p.get("processes", 1) != 1:
        accum, world = p.get("grad_accum", 1), p.get("processes", 1)
        per_step = f"{per_step} x {accum} accumulated x {world} processes"
    rows = [
        ("steps", str(p.get("steps", cost.get("steps", "?")))),
        ("examples per step", str(per_step)),
        ("learning rate", f"{p.get('lr')} (warmup {p.get('warmup_steps')} steps)"),
        ("weight decay, max grad norm", f"{p.get('weight_decay')}, {p.get('max_grad_norm')}"),
        ("seed", str(p.get("seed"))),
    ]
    if p.get("max_length") is not None:
        rows.append(("max length (tokens)", str(p["max_length"])))
    if cost:
        tokens = f"{cost.get('train_tokens', 0):,}"
        if cost.get("response_tokens") is not None:
            tokens += f" ({cost['response_tokens']:,} response tokens, where the loss falls)"
        rows += [
            ("training tokens", tokens),
            ("training FLOPs (6·N·tokens)", f"{cost.get('flops', 0):.3g}"),
            ("trainable parameters", f"{cost.get('trainable_params', 0):,}"),
            ("wall time", f"{cost.get('wall_s', 0):.1f} s"),
        ]
    return rows


def _final_losses(log: Path) -> dict[str, float]:
    """The last validation losses of ``train_log.csv``, overall and per source."""
    try:
        with open(log, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("val_loss")]
    except OSError:
        return {}
    if not rows:
        return {}
    last = rows[-1]
    losses = {}
    for key, value in last.items():
        if key.startswith("val_loss") and value not in ("", None):
            source = key.removeprefix("val_loss").removeprefix("_")
            losses[f"validation loss ({source})" if source else "validation loss"] = float(value)
    return losses


# ----------------------------------------------------------------------------------------------
# Merges
# ----------------------------------------------------------------------------------------------


def merge_card(record: dict, scores: Mapping[str, float] | None = None) -> Any:
    """The card of a merged model from its ``dem_merge.json``."""
    base = model_name(record["base"]["path"])
    inputs = [(_input_name(m), m) for m in record.get("models", [])]
    method = record.get("method", "?")
    front = {
        # The Hub's convention for merges: every parent model, and the relation.
        "base_model": [base, *(name for name, _ in inputs)],
        "base_model_relation": "merge",
        "library_name": "transformers",
        "license": base_license(record["base"]["path"]),
        "tags": ["dem", "merge", method],
    }
    formula = "θ0 + Σ w_i (θ_i − θ0)" if method == "dem" else f"method `{method}`"
    rows = [
        ("base model θ0", f"`{base}` (sha256 `{_short(record['base'].get('sha256'))}`)"),
        ("method", f"{method}: {formula}"),
        ("method parameters", _inline(record.get("parameters") or {}) or "none"),
        ("output dtype", str(record.get("dtype"))),
        ("compute dtype", str(record.get("compute_dtype"))),
        ("merge wall time", f"{record.get('wall_s', 0):.1f} s"),
        *_provenance_rows(record),
    ]
    table = ["| input | kind | weight w_i | sha256 |", "|---|---|---|---|"]
    for name, m in inputs:
        weight, digest = m.get("weight"), _short(m.get("sha256"))
        table.append(f"| `{name}` | {m.get('kind')} | {weight:g} | `{digest}` |")
    intro = (
        f"A merge made with dem, the reproducible implementation of {PAPER}: each input is a "
        "model fine-tuned from the base on one data source (or its distribution vector), "
        "combined with the weights below. The full record is `dem_merge.json` beside this card."
    )
    title = f"{method} merge of {len(inputs)} models on `{base}`"
    body = _body(title, intro, rows, dict(scores or {}), record.get("command"))
    body = body.replace("\n## Scores", "\n## Inputs\n\n" + "\n".join(table) + "\n\n## Scores", 1)
    return _card(front, body)


def _input_name(entry: Mapping[str, Any]) -> str:
    """A merge input by the model it stands for (a vector by the fine-tune it came from)."""
    source = (entry.get("vector_of") or {}).get("source")
    return model_name(source or entry["path"])


def base_card(record: dict) -> Any:
    """The card of a base dem converted into a plain fp32 safetensors folder (``dem_base.json``)."""
    source = record["source"] + (f" ({record['gguf_file']})" if record.get("gguf_file") else "")
    gguf = bool(record.get("gguf_file")) or str(record["source"]).endswith(".gguf")
    front = {
        "base_model": source,
        "library_name": "transformers",
        "license": _record_license(record),
        "tags": ["dem", "dequantized"] if gguf else ["dem"],
    }
    how = "dequantized from GGUF to fp32" if gguf else "loaded and saved as fp32 safetensors"
    body = (
        f"# `{source}`, as a plain safetensors folder\n\nThe weights of `{source}`, {how} by "
        f"dem (the reproducible implementation of {PAPER}) so that later loads take seconds; "
        "logits are identical to the source's. Fine-tunes and merges start from this folder. "
        "`dem_base.json` records the source.\n"
    )
    return _card(front, body)


# ----------------------------------------------------------------------------------------------
# Shared parts
# ----------------------------------------------------------------------------------------------


def model_name(path_or_id: str) -> str:
    """How a card names a model: ``dem:NAME`` for a shipped base, the source a converted base
    came from, otherwise the path or hub id as given."""
    from dem.resources import DATA

    path = Path(path_or_id)
    if not path.is_dir():
        return str(path_or_id)
    shipped = (DATA / "bases").resolve()
    if path.resolve().parent == shipped:
        return f"dem:{path.resolve().name}"
    converted = _base_source(path)
    if converted:
        return converted
    return str(path_or_id)


def _base_source(folder: Path) -> str | None:
    """The source of a base dem converted (``dem_base.json``: a hub id, a GGUF file)."""
    try:
        record = json.loads((folder / "dem_base.json").read_text())
    except (OSError, ValueError):
        return None
    source, gguf = record.get("source"), record.get("gguf_file")
    return f"{source} ({gguf})" if source and gguf else source


def base_license(base: str) -> str | None:
    """The base's license where it says one: its card's front matter, a converted GGUF's
    ``general.license``, or the Hub card in the local cache. None when nothing says."""
    from dem.models import shipped_base

    folder = Path(shipped_base(base))
    if folder.is_dir():
        return _card_license(folder / CARD) or _gguf_license(folder)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(base), CARD)  # never asks the network
    except Exception:  # not a valid repo id: nothing to inherit
        return None
    return _card_license(Path(cached)) if isinstance(cached, str) else None


def _card_license(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(path, ignore_metadata_errors=True).data.license
    except Exception:  # a README without readable front matter says nothing
        return None


def _gguf_license(folder: Path) -> str | None:
    """``general.license`` of the GGUF file a converted base came from (``dem_base.json``)."""
    try:
        return _record_license(json.loads((folder / BASE_RECORD).read_text()))
    except (OSError, ValueError):  # no record: not a converted base
        return None


def _record_license(record: Mapping[str, Any]) -> str | None:
    """The license a converted base's source states: a GGUF's ``general.license``, or the card
    of a local folder."""
    try:
        from gguf import GGUFReader

        from dem.models import _split_gguf

        where, name = _split_gguf(record["source"], record.get("gguf_file"))
        if name is None:
            return _card_license(Path(where) / CARD)
        field = GGUFReader(Path(where) / name).fields.get("general.license")
        return str(field.contents()) if field is not None else None
    except Exception:  # no gguf package, file gone, a hub id: the license is unknown
        return None


def _provenance_rows(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    git = record.get("git") or {}
    commit = git.get("commit") or "unknown (not run from a git checkout)"
    if git.get("dirty"):
        commit += " (with uncommitted changes)"
    versions = record.get("versions") or {}
    software = ", ".join(
        f"{k} {versions[k]}" for k in ("dem", "torch", "transformers", "peft") if versions.get(k)
    )
    made = str(record.get("time"))
    return [("dem commit", f"`{commit}`"), ("software", software), ("made", made)]


def _body(title: str, intro: str, rows, scores: Mapping[str, float], command) -> str:
    lines = [f"# {title}", "", intro, "", "## Recipe", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Scores", ""]
    if scores:
        lines += ["| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in scores.items()]
    else:
        lines.append("None measured yet.")
    if command:
        shown = command if isinstance(command, str) else " ".join(command)
        lines += ["", "## Made by", "", f"```\n{shown}\n```"]
    return "\n".join(lines) + "\n"


def _mixture(mixture: Mapping[str, float]) -> str:
    total = sum(mixture.values()) or 1.0
    return ", ".join(f"{k} {v / total:.3g}" for k, v in mixture.items())


def _inline(mapping: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in mapping.items())


def _short(digest: str | Mapping[str, str] | None) -> str:
    """The first 12 hex digits; of each file's, for a record of file -> digest."""
    if isinstance(digest, Mapping):
        return ", ".join(d[:12] for d in digest.values()) or "?"
    return (digest or "?")[:12]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())
