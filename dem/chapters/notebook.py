"""What every chapter does before its first section and after its last: :func:`setup` and
:meth:`Run.finish`.

A chapter's papermill ``parameters`` cell is written from :class:`dem.config.RunConfig` (literal
values, so ``papermill --help-notebook`` can list them). ``run = setup(globals(), chapter="04")``
checks those values against the declaration, checks that the chapters before it finished in the
run folder with the same settings (else it stops, naming the chapter to run first), seeds torch,
sets the CPU threads, picks the device, builds the sources and names the run folder; the
chapter's last cell, ``run.finish()``, records that it finished. The values derived from parameters that several chapters share (per-source step
budgets, the DMix mixtures) are computed here too, so each chapter derives them the same way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dem import DemError, models, precision, resources
from dem.chapters import plots
from dem.chapters.display import chapter_display
from dem.config import ALL, RunConfig, make_config
from dem.io import write_json
from dem.layout import RunLayout
from dem.sources import get_source, list_sources

# The parameters every chapter declares and setup() reads (each chapter's parameters cell
# documents them).
SETUP_PARAMETERS = (
    "run_dir",
    "seed",
    "sources",
    "composite",
    "n_train",
    "n_validation",
    "n_test",
    "base_model",
    "max_new_tokens",
    "device",
    "dtype",
)


@dataclass
class Run:
    """What a chapter works with: the run folder, the device and the sources."""

    layout: RunLayout
    seed: int
    device: torch.device
    threads: int
    composite: str  # name of the evaluation-only composite source; empty for none
    source_kwargs: dict  # seed and split sizes, as get_source takes them
    custom_sources: dict  # your own sources (dicts in `sources`), by name
    train_sources: list  # one fine-tune each
    eval_sources: list  # train_sources plus the composite source
    max_new_tokens: int = 0  # cap on generated tokens per answer (0: each source's own)
    params: dict = field(default_factory=dict, repr=False)
    chapter: str = ""  # "04"; empty outside a chapter
    settings: dict = field(default_factory=dict, repr=False)  # every setting the chapter declares

    def finish(self) -> Path:
        """Record that this chapter finished, with its settings: the next chapters check it."""
        path = self.layout.chapter_record(self.chapter)
        record = {"chapter": self.chapter, "settings": self.settings,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
        write_json(path, record)
        return path

    @property
    def names(self) -> list[str]:
        """The training sources' names, in `sources` order."""
        return [s.name for s in self.train_sources]

    def source(self, spec: str | dict):
        """A source built as :func:`setup` builds them (same seed, sizes and token cap)."""
        return cap_new_tokens(get_source(spec, **self.source_kwargs), self.max_new_tokens)

    def steps(
        self, finetune_steps: int, source_steps: Mapping[str, int], names: Sequence[str] = ()
    ) -> dict[str, int]:
        """Fine-tuning steps per source: ``source_steps`` where given, else ``finetune_steps``.

        ``names`` defaults to the training sources. A name in ``source_steps`` that is no known
        source is refused: it would otherwise silently train for ``finetune_steps``.
        """
        known = set(list_sources()) | set(self.custom_sources)
        bad = {
            k: v
            for k, v in source_steps.items()
            if k not in known or not isinstance(v, int) or v < 1
        }
        if bad:
            raise DemError(
                "source_steps: expected known source names mapped to positive step counts, "
                f"got {bad}"
            )
        return {n: source_steps.get(n, finetune_steps) for n in (names or self.names)}


def cap_new_tokens(source, max_new_tokens: int):
    """``source`` with its generation budget capped at ``max_new_tokens`` (0: no cap).

    A cap keeps smoke runs of real models short; the source itself is left unchanged.
    """
    return source.with_max_new_tokens(
        min(source.max_new_tokens, max_new_tokens or source.max_new_tokens)
    )


def resolve_run_dir(run_dir: str | Path) -> Path:
    """A relative run folder is relative to the project folder, the one holding ``notebooks/``.

    JupyterLab starts each kernel in the notebook's folder while ``dem run`` is started from
    the project folder: both must write to the same ``runs/default``.
    """
    path = Path(run_dir)
    if path.is_absolute():
        return path
    here = Path.cwd()
    if here.name == "notebooks" and (here / "params").is_dir():
        here = here.parent
    return here / path


def _check_earlier_chapters(layout: RunLayout, chapter: str, settings: Mapping) -> None:
    """Stop, in one sentence, unless every earlier chapter finished with the same settings."""
    for earlier in ALL[: ALL.index(chapter)]:
        path = layout.chapter_record(earlier)
        name = next(iter(sorted(resources.NOTEBOOKS.glob(f"{earlier}_*.ipynb"))), None)
        title = name.name if name else f"chapter {earlier}"
        if not path.is_file():
            raise DemError(f"chapter {chapter} needs {title} finished in {layout.root}: "
                           f"run it first (or `dem run --from {earlier}`)")  # fmt: skip
        ran = json.loads(path.read_text())["settings"]
        differ = sorted(
            k for k in settings if k != "run_dir" and k in ran and ran[k] != settings[k]
        )
        if differ:
            k = differ[0]
            raise DemError(f"{title} ran in {layout.root} with {k}={ran[k]!r}, this chapter has "
                           f"{settings[k]!r}: rerun {title} or use its settings")  # fmt: skip


def setup(params: Mapping[str, Any], chapter: str = "") -> Run:
    """Seed, threads, device, sources and run folder from a chapter's parameters.

    ``params`` is the chapter's namespace (``globals()``) or any mapping holding at least
    :data:`SETUP_PARAMETERS`; those are kept as ``run.params``. With ``chapter`` (``"04"``),
    every setting the chapter declares is checked against :class:`RunConfig`, and the earlier
    chapters must have finished in the run folder with the same settings.
    """
    missing = [name for name in SETUP_PARAMETERS if name not in params]
    if missing:
        raise DemError(f"setup: parameter(s) {missing} not given")
    settings = {}
    if chapter:
        settings = {n: params[n] for n in RunConfig.names(chapter) if n in params}
        make_config(settings, where=f"chapter {chapter}'s parameters")
    p = {name: params[name] for name in SETUP_PARAMETERS}
    p["run_dir"] = str(resolve_run_dir(p["run_dir"]))
    layout = RunLayout(p["run_dir"])
    if chapter:
        _check_earlier_chapters(layout, chapter, settings)
    seed = p["seed"]
    torch.manual_seed(seed)
    source_kwargs = dict(
        seed=seed, n_train=p["n_train"], n_validation=p["n_validation"], n_test=p["n_test"]
    )
    custom_sources = {s["name"]: s for s in p["sources"] if isinstance(s, dict)}
    built = [get_source(spec, **source_kwargs) for spec in p["sources"]]
    if p["composite"]:
        built.append(get_source(p["composite"], **source_kwargs))
    built = [cap_new_tokens(s, p["max_new_tokens"]) for s in built]
    device = models.pick_device(p["device"])
    # a real LM gets every core and, where measured faster, bf16 (dem.precision, dem.models)
    large = precision.base_is_large(p["base_model"])
    threads = models.set_cpu_threads(large_model=large)
    dtype = precision.pick_dtype(device, p["dtype"], large=large)
    precision.set_compute_dtype(dtype)
    plots.use_theme()
    chapter_display()
    print(f"device: {device}, dtype: {precision.dtype_name(dtype)}, CPU threads: {threads}, "
          f"run folder: {layout.root}")  # fmt: skip
    return Run(
        layout=layout,
        seed=seed,
        device=device,
        threads=threads,
        composite=p["composite"],
        source_kwargs=source_kwargs,
        custom_sources=custom_sources,
        train_sources=built[: len(p["sources"])],
        eval_sources=built,
        max_new_tokens=p["max_new_tokens"],
        params=p,
        chapter=chapter,
        settings={**settings, "run_dir": p["run_dir"]} if chapter else {},
    )


def dmix_mixtures(names: Sequence[str], grid: Sequence[Sequence[float]]) -> dict[str, dict]:
    """DMix runs by label (``dmix_2-1-1-1``): each a mixture {source: ratio} in ``names`` order."""
    bad = [r for r in grid if len(r) != len(names)]
    if bad:
        raise DemError(f"dmix_grid entries must have {len(names)} ratios (one per source): {bad}")
    return {
        "dmix_" + "-".join(f"{x:g}" for x in r): dict(zip(names, map(float, r), strict=True))
        for r in grid
    }
