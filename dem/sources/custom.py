"""Your own data as a source: a local jsonl/json/csv/parquet file or a Hugging Face dataset.

A dict describes it (keys in :data:`CUSTOM_KEYS`, documented at :func:`dem.sources.get_source`):
where the rows are, a ``prompt_template`` over a row's fields and the ``response_field``. Rows
are split 80/10/10 by a hash of the prompt, like every other source.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dem import DemError
from dem.sources.core import Example, Source, pooled
from dem.sources.extract import EXTRACTORS
from dem.sources.files import read_rows

CUSTOM_KEYS = {
    "name", "description", "path", "hf", "config", "split", "prompt_template", "response_field",
    "answer_field", "metric", "extractor", "choices_field", "max_new_tokens", "data_files",
}  # fmt: skip


def _hf_rows(
    dataset_id: str, config: str | None, split: str, data_files: Any = None
) -> list[dict[str, Any]]:
    import datasets

    try:
        data = datasets.load_dataset(dataset_id, config, split=split, data_files=data_files)
    except Exception as err:  # offline, unknown id, unknown config: all the user's to fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DemError(
            f"cannot load dataset {dataset_id!r} (config {config!r}, split {split!r}): {first}"
        ) from None
    return list(data)


def _field(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise DemError(f"{where}: no field {key!r}; fields are {sorted(row)}")
    return row[key]


def _check_spec(spec: dict[str, Any]) -> None:
    """Refuse, naming the key, what a custom source's description gets wrong."""
    unknown = set(spec) - CUSTOM_KEYS
    if unknown:
        raise DemError(
            f"custom source: unknown key(s) {sorted(unknown)}; allowed: {sorted(CUSTOM_KEYS)}"
        )
    if ("path" in spec) == ("hf" in spec):
        raise DemError(
            "custom source: give exactly one of 'path' (local file) or 'hf' (dataset id)"
        )
    for key in ("prompt_template", "response_field"):
        if not spec.get(key):
            raise DemError(f"custom source: {key!r} is required")
    metric = spec.get("metric", "exact_match")
    if metric not in ("exact_match", "choice"):
        raise DemError(f"custom source: metric {metric!r} unknown; use 'exact_match' or 'choice'")
    if metric == "choice" and not spec.get("choices_field"):
        raise DemError("custom source: metric 'choice' needs 'choices_field'")
    extractor = spec.get("extractor", "text")
    if extractor not in EXTRACTORS:
        raise DemError(
            f"custom source: extractor {extractor!r} unknown; use one of {sorted(EXTRACTORS)}"
        )


def _example(spec: dict[str, Any], row: dict[str, Any], where: str, name: str) -> Example:
    """One row as an example: the prompt from the template, the response, answer, choices."""
    try:
        prompt = spec["prompt_template"].format(**row)
    except KeyError as err:
        raise DemError(
            f"{where}: prompt_template needs field {err.args[0]!r}; fields are {sorted(row)}"
        ) from None
    except (IndexError, ValueError) as err:
        raise DemError(f"custom source {name!r}: bad prompt_template ({err})") from None
    response = str(_field(row, spec["response_field"], where))
    raw_answer = (
        str(_field(row, spec["answer_field"], where)) if spec.get("answer_field") else response
    )
    choices: tuple[str, ...] = ()
    if spec.get("metric", "exact_match") == "choice":
        raw = _field(row, spec["choices_field"], where)
        choices = tuple(raw.split("\n") if isinstance(raw, str) else (str(c) for c in raw))
        choices = tuple(c.strip() for c in choices if str(c).strip())
    extract = EXTRACTORS[spec.get("extractor", "text")]
    return Example(prompt, response, extract(raw_answer), choices)


def custom_source(spec: dict[str, Any]) -> Source:
    """A source from a local file or a Hugging Face dataset, described by a dict."""
    _check_spec(spec)
    origin = str(spec.get("path") or spec.get("hf"))
    name = spec.get("name") or Path(origin).stem

    def rows() -> list[dict[str, Any]]:
        if "path" in spec:
            return read_rows(spec["path"])
        return _hf_rows(
            spec["hf"], spec.get("config"), spec.get("split") or "train", spec.get("data_files")
        )

    def pool() -> Iterator[Example]:
        data = rows()
        if not data:
            raise DemError(f"custom source {name!r}: {origin} has no rows")
        for i, row in enumerate(data, 1):
            yield _example(spec, row, f"{origin} row {i}", name)

    return Source(
        name=name,
        description=spec.get("description")
        or f"custom source from {origin} (split 80/10/10 by us)",
        metric=spec.get("metric", "exact_match"),
        max_new_tokens=int(spec.get("max_new_tokens", 64)),
        extractor=spec.get("extractor", "text"),
        make_examples=pooled(pool, repeat_train=False),
    )
