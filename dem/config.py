"""Every setting of a tutorial run, declared once: :class:`RunConfig`.

Each field is one setting with its type, its default and a one-line why; the defaults *are* the
embedded default (``notebooks/params/default.yaml`` adds nothing). From this list:

- the chapters' ``parameters`` cells (written by ``python -m dem.config_files``, checked by a test);
- the parameter files, each listing only what it changes: :func:`make_config` refuses an
  unknown key or a value of the wrong type or outside its choices, naming the file and key;
- ``dem run --set KEY=VALUE``, ``dem config`` (every setting with its why) and the checks of
  :meth:`dem.chapters.notebook.setup` on the values a chapter was run with.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from dem import DemError
from dem.checks import at_least, device_name, fraction, is_number, one_of, problem

ALL = ("01", "02", "03", "04", "05", "06")
TRAINING = ("02", "05", "06")  # the chapters that train (06: the swap's new fine-tune)
CORPORA = ("generic", "knowledge")
SELECT_METRICS = ("accuracy", "loss")


def _strategies() -> tuple:
    from dem.search.strategies import STRATEGIES  # gradient search runs beside the chosen one (04)

    return tuple(s for s in STRATEGIES if s != "gradient")


def _dtypes() -> tuple:
    from dem.precision import DTYPES  # read lazily: it imports torch

    return DTYPES


def _merge_methods() -> tuple:
    from dem.merging.methods import METHODS  # read lazily: it imports torch

    return tuple(METHODS)


def setting(
    default: Any,
    help: str,
    *,
    chapters: tuple[str, ...] = ALL,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A run setting: its default, a one-line help, the chapters that declare it, its check.

    ``check`` returns what was expected (a phrase) when the value is refused, else None.
    """
    meta = {"help": help, "chapters": chapters, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """The settings of one run of the tutorial; the defaults are the embedded default.

    The faithful regime: a 2.6M-parameter Llama pretrained once on prose, the sources' knowledge
    in raw form and requests worded unlike any source (shipped: ``dem:tiny-knowledge``), fine-tuned
    briefly on each of four generated sources, which moves its weights by a few percent. CPU,
    offline, about 15 minutes on 2 cores.
    """

    run_dir: str = setting(
        "runs/default",
        "folder for everything this run writes (relative: to the folder holding notebooks/); "
        "`dem run` sets it",
    )
    seed: int = setting(
        0, "seeds every generator, split, initialisation and data order", check=at_least(0)
    )
    # --- data -----------------------------------------------------------------------------
    sources: list[str | dict] = setting(
        ["arithmetic", "arithmetic_cot", "word_edit", "facts"],
        "data sources, one fine-tune each (`dem sources list`; a dict for your own data)",
    )
    composite: str = setting(
        "composite",
        "held-out set needing two skills at once, never trained on; empty for none",
    )
    n_train: int = setting(
        2000,
        "training examples per source (built-in sources generate exactly this many)",
        check=at_least(1),
    )
    n_validation: int = setting(
        200,
        "validation examples per source: they choose weights, ratios and λs",
        check=at_least(1),
    )
    n_test: int = setting(200, "test examples per source: they only report", check=at_least(1))
    # --- the base -------------------------------------------------------------------------
    base_model: str = setting(
        "dem:tiny-knowledge",
        "the pretrained base: dem:NAME (shipped, data/bases), a HF id, a model folder or a "
        ".gguf file; empty: a tiny base pretrained from scratch in chapter 02",
    )
    gguf_file: str = setting(
        "", "file name inside base_model when it is a GGUF repository or folder"
    )
    max_length: int = setting(
        128,
        "tokens per example (prompt + response); longer ones are counted and reported",
        check=at_least(1),
    )
    max_new_tokens: int = setting(
        0, "cap on generated tokens per answer (0: each source's own budget)", check=at_least(0)
    )
    device: str = setting(
        "auto", "auto picks cuda, then mps, then cpu; or name one", check=device_name
    )
    dtype: str = setting(
        "auto", "bf16 autocast where faster (dem/precision.py), or float32", check=one_of(_dtypes)
    )
    pretrain_steps: int = setting(
        600,
        "steps of pretraining for the tiny base (only with an empty base_model)",
        chapters=("02",),
        check=at_least(1),
    )
    pretrain_corpus: str = setting(
        "generic",
        "its text: generic (prose only) or knowledge (the sources' knowledge, not their formats)",
        chapters=("02",),
        check=one_of(CORPORA),
    )
    # --- fine-tuning (chapter 02; DMix in 05 and the swap in 06 train the same way) ---------
    # Chosen with benchmarks/probe_regime.py on a base pretrained like dem:tiny-knowledge
    # (validation, 100 examples per source): lr 2e-4 x 200 steps x batch 16 moved the weights
    # by 4-6% (|v|/|θ0|) and taught every source; lr 1e-4 x batch 32: 3-4% at twice the cost;
    # lr 3e-4: 6-8% with more interference in the pair sums. The scratch contrast's 1e-3: 23-32%.
    finetune_steps: int = setting(
        200,
        "optimizer steps per source (times batch 16: 3.2k examples)",
        chapters=TRAINING,
        check=at_least(1),
    )
    source_steps: dict[str, int] = setting(
        {},
        "steps for particular sources, overriding finetune_steps, as in {arithmetic: 600}",
        chapters=TRAINING,
    )
    batch_size: int = setting(
        16,
        "examples per optimizer step (chapter 01 measures padding at this size)",
        chapters=("01", *TRAINING),
        check=at_least(1),
    )
    learning_rate: float = setting(
        2e-4,
        "peak AdamW learning rate (warmup, then cosine decay)",
        chapters=TRAINING,
        check=at_least(0, above=True),
    )
    warmup_steps: int = setting(20, "linear warmup steps", chapters=TRAINING, check=at_least(0))
    grad_accum: int = setting(1, "micro-batches per step", chapters=TRAINING, check=at_least(1))
    eval_every: int = setting(
        100,
        "validation loss (logged only, no weight changes) and a checkpoint every N steps",
        chapters=TRAINING,
        check=at_least(1),
    )
    lora_r: int = setting(
        0,
        "LoRA rank through peft, adapters merged before saving; 0 means full fine-tuning",
        chapters=TRAINING,
        check=at_least(0),
    )
    # --- evaluation -----------------------------------------------------------------------
    eval_max_examples: int = setting(
        100,
        "test examples scored per source (0: all); 100 gives ±5 points of binomial noise",
        chapters=("02", "04", "05", "06"),
        check=at_least(0),
    )
    eval_batch_size: int = setting(
        64,
        "sequences per evaluation batch",
        chapters=("02", "03", "04", "05", "06"),
        check=at_least(1),
    )
    # --- distribution vectors (chapter 03) --------------------------------------------------
    path_points: list[float] = setting(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        "points t on each straight path (empty: skip section 5)",
        chapters=("03",),
    )
    path_max_examples: int = setting(
        50,
        "validation examples per source scored at each point (0: all)",
        chapters=("03",),
        check=at_least(0),
    )
    # --- the weight search (chapter 04; 06 searches again after the swap) ------------------
    search_strategy: str = setting(
        "grid",
        "grid (the paper's), random, coordinate or tpe; the gradient, AdaMerging and TPE "
        "searches run beside it (chapter 04, section 5)",
        chapters=("04", "06"),
        check=one_of(_strategies),
    )
    search_values: list[float] = setting(
        [0.0, 0.5, 1.0],
        "candidate values of each w_i (grid, coordinate): the paper's grid, 3^4: 81 "
        "candidates, each scored in memory",
        chapters=("04", "06"),
    )
    search_trials: int = setting(
        32,
        "candidates of the random strategy (and of tpe when it is search_strategy)",
        chapters=("04", "06"),
        check=at_least(1),
    )
    select_metric: str = setting(
        "accuracy",
        "the one validation metric that chooses DEM's weights, every λ and the DMix ratio",
        chapters=("04", "05", "06"),
        check=one_of(SELECT_METRICS),
    )
    search_max_examples: int = setting(
        50,
        "validation examples per source scoring each candidate (0: all); the next 50 are the "
        "gradient search's fit set",
        chapters=("04", "06"),
        check=at_least(0),
    )
    gradient_steps: int = setting(
        50,
        "Adam steps of the gradient weight searches (section 5)",
        chapters=("04",),
        check=at_least(1),
    )
    # 8, 5 and 0.05: on the default the selection loss crosses the grid's best by step 3-5
    # and falls fastest in the first 10 steps (benchmarks/bench_weight_search.py).
    gradient_minibatch: int = setting(
        8,
        "fit examples per source in each step's forward and backward pass",
        chapters=("04",),
        check=at_least(1),
    )
    gradient_select_every: int = setting(
        5,
        "the descent's point is scored every this many steps (and its start and end)",
        chapters=("04",),
        check=at_least(1),
    )
    gradient_lr: float = setting(
        0.05,
        "their step size; weights stay in [0, 1.5]",
        chapters=("04",),
        check=at_least(0, above=True),
    )
    # Measured on the default (seed 0, per-layer weights from 0.3 in [0, 1], minibatch 8; loss on
    # the 50 selection examples per source, 1.607 at the start): FusionBench's lr 1e-4 x 1000
    # steps moves the weights by 0.06 on average (max 0.10) and reaches 1.410; 1e-3 x 500: 0.17,
    # 1.176; 3e-3 x 500: 0.26 (max 0.66, none pinned at a bound), 1.117, the best; 1e-2 x 300 and
    # the 50-step search's 0.05 pin most weights at 0 or 1 (1.118, 1.122). 500 steps: ~3 min here.
    adamerging_steps: int = setting(
        500,
        "Adam steps of the AdaMerging-style per-layer search (section 5), as AdaMerging trains "
        "its coefficients; scored every tenth of them",
        chapters=("04",),
        check=at_least(1),
    )
    adamerging_lr: float = setting(
        3e-3,
        "its step size; weights start at 0.3 (the paper's init) and stay in [0, 1]",
        chapters=("04",),
        check=at_least(0, above=True),
    )
    tpe_trials: int = setting(
        0,
        "candidates Optuna's TPE sampler scores, the individuals among them (section 5); 0: as "
        "many as the grid of search_values",
        chapters=("04",),
        check=at_least(0),
    )
    # --- the merging baselines (chapter 04) -----------------------------------------------
    lambdas: list[float] = setting(
        [0.25, 0.5, 0.75, 1.0],
        "λ values searched on validation for every baseline with a λ (section 4)",
        chapters=("04",),
    )
    ties_density: float = setting(
        0.2,
        "fraction of each vector's entries TIES keeps (by magnitude)",
        chapters=("04",),
        check=fraction(open_high=False),
    )
    dare_drop_prob: float = setting(
        0.5,
        "probability DARE drops each entry (survivors rescaled by 1/(1-p))",
        chapters=("04",),
        check=fraction(open_high=True),
    )
    more_merges: list[str] = setting(
        ["breadcrumbs", "della", "model_stock"],
        "further baselines of `dem merge`, each at its defaults (section 4)",
        chapters=("04",),
        check=one_of(_merge_methods),
    )
    landscape: list[str] = setting(
        ["word_edit", "facts"],
        "two sources whose weights span the landscape heatmap (empty: skip it)",
        chapters=("04",),
    )
    landscape_values: list[float] = setting(
        [0.0, 0.5, 1.0],
        "values of each of those two weights (the grid's: the landscape costs no new evaluation)",
        chapters=("04",),
    )
    # --- data mixing (chapter 05) ---------------------------------------------------------
    dmix_steps: int = setting(
        0,
        "steps per DMix run; 0 means the steps of all fine-tunes together, the budget of DEM",
        chapters=("05",),
        check=at_least(0),
    )
    dmix_grid: list[list[float]] = setting(
        [[1, 1, 1, 1], [2, 1, 1, 1], [1, 2, 1, 1]],
        "mixture ratios, one list per run, in `sources` order; the first is uniform; each "
        "run has DEM's total budget",
        chapters=("05",),
    )
    dmix_dem_guided: bool = setting(
        True,
        "one more DMix run, at the ratio DEM's chosen weights imply (normalized), beside the "
        "ratio search: what DEM's weights are worth as a mixture",
        chapters=("05",),
    )
    # --- the swap experiment (chapter 06) -------------------------------------------------
    swap_out: str = setting(
        "facts",
        "the source replaced in the swap experiment (empty: skip the experiment)",
        chapters=("06",),
    )
    swap_in: str = setting("compare", "the source that replaces it", chapters=("06",))

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _problem(f, getattr(self, f.name))
            if problem:
                raise DemError(f"{f.name}: expected {problem}, got {getattr(self, f.name)!r}")

    @classmethod
    def names(cls, chapter: str | None = None) -> list[str]:
        """The settings, in declaration order; those ``chapter`` (``"04"``) declares."""
        return [f.name for f in fields(cls) if chapter is None or chapter in f.metadata["chapters"]]

    def to_dict(self, chapter: str | None = None) -> dict[str, Any]:
        return {name: copy.deepcopy(getattr(self, name)) for name in self.names(chapter)}

    def changes(self) -> dict[str, Any]:
        """The settings that differ from the defaults (what a parameter file would list)."""
        default = RunConfig()
        return {n: v for n, v in self.to_dict().items() if v != getattr(default, n)}


# Only run_dir is set by `dem run` itself: a parameter file must not set it.
RESERVED = ("run_dir",)


def setting_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _problem(f, value: Any) -> str | None:
    """What ``value`` should have been for field ``f``, or None when it is acceptable."""
    return problem(setting_types()[f.name], f.metadata["check"], value)


def _coerced(config: RunConfig) -> RunConfig:
    """Floats where floats are declared (YAML reads ``1`` as an int)."""
    types = setting_types()
    changes = {
        n: float(v) for n, v in config.to_dict().items() if types[n] is float and isinstance(v, int)
    }
    return config if not changes else RunConfig(**{**config.to_dict(), **changes})


def make_config(values: Mapping[str, Any], where: str = "parameters") -> RunConfig:
    """A validated :class:`RunConfig` from ``values`` (the defaults for the rest).

    Refuses, in one line naming ``where`` and the key: an unknown key (with the closest known
    one), a value of the wrong type or outside its choices or range.
    """
    known = RunConfig.names()
    for key, value in values.items():
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (`dem config` lists them)"
            raise DemError(f"{where}: unknown setting {key!r}{hint}")
        f = next(f for f in fields(RunConfig) if f.name == key)
        problem = _problem(f, value)
        if problem:
            hint = ""
            if isinstance(value, str) and is_number(value):
                hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
            raise DemError(f"{where}: {key} must be {problem}, got {value!r}{hint}")
    return _coerced(RunConfig(**values))


def default_of(name: str) -> Any:
    """A setting's default without building a RunConfig (its checks import the search)."""
    f = RunConfig.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default
