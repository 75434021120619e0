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


LOCK = ROOT / "requirements" / "lock-cpu.txt"


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==([^ ;\\]+)", line)
        if match:
            name = match[1].lower().replace("_", "-")
            assert name not in pins, f"{name} is pinned twice in {LOCK.name}"
            pins[name] = match[2]
    return pins


def _ci_torch() -> str:
    return re.search(r"torch==([0-9][0-9a-z.+]*)", (ROOT / ".ci" / "run").read_text())[1]


def test_lock_pins_a_version_within_every_pyproject_range():
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    pins = {**_lock_pins(), "torch": _ci_torch()}  # torch: installed first by .ci/run
    # The lock is for CI's interpreter and platform; markers are evaluated there.
    where = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}  # fmt: skip
    checked = 0
    for text in project["dependencies"] + extras["dev"] + extras["real"]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(where):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{LOCK.name} does not pin {name} ({text!r} in pyproject.toml)"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject.toml's {text!r}"
        )
        checked += 1
    assert checked >= 20


def test_lock_leaves_torch_to_ci_and_pins_the_offline_data_wheels():
    from dem.sources.real import REAL_DATA_PACKAGES, REAL_MODEL_PACKAGES

    pins = _lock_pins()
    # .ci/run installs the CPU torch from local disk first; PyPI's torch (and its CUDA
    # libraries) in the lock would replace it with a multi-GB CUDA build or fail its hash.
    assert not [n for n in pins if n in {"torch", "triton"} or n.startswith(("nvidia-", "cuda-"))]
    assert f"Resolved against torch=={_ci_torch()};" in LOCK.read_text()
    for package in REAL_DATA_PACKAGES + REAL_MODEL_PACKAGES:
        name, _, version = package.partition("==")
        assert version, f"dem sources install must pin {name} (dem/sources/real.py)"
        assert pins.get(name) == version, (
            f"{LOCK.name} pins {name}=={pins.get(name)}, not {version}"
        )
    ci = (ROOT / ".ci" / "run").read_text()
    assert "--require-hashes -r requirements/lock-cpu.txt" in ci
    # environment.yml builds the same interpreter the lock was resolved for.
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"] and "Python 3.11, Linux x86_64" in LOCK.read_text()
