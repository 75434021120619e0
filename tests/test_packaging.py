"""The install files agree with each other and with the README."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the dev extra installs the backport
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # The environment installs the package itself, with the dev extra, so every runtime and dev
    # dependency comes from pyproject.toml; nothing may be listed twice with its own pin.
    assert pip == ["-e .[dev]"], pip
    python = next(d for d in conda if d.startswith("python"))
    minimum = _pyproject()["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, python.split("=")[-1].split("."))) >= tuple(map(int, minimum.split(".")))
    declared = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    for dep in conda:
        name = _name(dep)
        assert name in {"python", "pip"} or name in declared, (
            f"environment.yml lists {dep!r}, which pyproject.toml does not declare"
        )
    assert "conda-forge" in env["channels"]


def test_design_card_packages_are_dependencies():
    declared = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    card = {
        "torch",
        "transformers",
        "datasets",
        "seaborn",
        "safetensors",
        "papermill",
        "jupyterlab",
    }
    assert card <= declared, card - declared
    dev = {_name(r) for r in _pyproject()["project"]["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff"} <= dev


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    marker = "# --- the README's test command, verbatim ---\n"
    ci_command = ci.split(marker, 1)[1].strip().splitlines()[0]
    assert ci_command in readme, f"README does not contain the CI test command {ci_command!r}"
    assert "torch==2.13.0" in ci
