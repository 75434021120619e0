"""Answer extraction: from a model's generated text to the answer a metric compares.

Each extractor is a function ``str -> str`` returning the normalised answer ('' when none is
found); a source names its extractor by key of :data:`EXTRACTORS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """Canonical form of a number: no thousands commas, no trailing ``.0``; '' if none."""
    text = text.replace(",", "").strip()
    try:
        value = float(text)
    except ValueError:
        return ""
    return str(int(value)) if value == int(value) else repr(value)


def normalize_text(text: str) -> str:
    """First line, stripped, trailing period removed (exact match otherwise: case matters)."""
    line = text.strip().split("\n", 1)[0].strip()
    return line[:-1].rstrip() if line.endswith(".") else line


def extract_first_number(generated: str) -> str:
    """The first number in the text (direct answers: the model should emit just it)."""
    match = _NUMBER.search(generated)
    return normalize_number(match.group()) if match else ""


def extract_hash_number(generated: str) -> str:
    """The number after the last ``####`` marker (GSM8K style); else the last number.

    The fallback is the usual "flexible extract": a model that computes the right number but
    forgets the marker still gets credit, and a model that never emits numbers gets none.
    """
    if "####" in generated:
        tail = generated.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        return normalize_number(match.group()) if match else ""
    numbers = _NUMBER.findall(generated)
    return normalize_number(numbers[-1]) if numbers else ""


def extract_yes_no(generated: str) -> str:
    """'yes' or 'no' from the first word (true/false accepted); '' otherwise."""
    words = re.findall(r"[a-zA-Z]+", generated)
    first = words[0].lower() if words else ""
    return {"yes": "yes", "true": "yes", "no": "no", "false": "no"}.get(first, "")


def extract_choice_letter(generated: str) -> str:
    """The choice letter (A-E) at the start of the text, as in 'B. bookstore' or '(B)'."""
    match = re.match(r"\s*\(?([A-Ea-e])\b", generated)
    return match.group(1).upper() if match else ""


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "text": normalize_text,
    "first_number": extract_first_number,
    "hash_number": extract_hash_number,
    "yes_no": extract_yes_no,
    "choice_letter": extract_choice_letter,
}
