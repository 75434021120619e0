"""The run folder as an object: every path a chapter reads or writes, named once.

The chapters hand files to each other through the run folder (chapter 06 reads what 02, 04 and
05 wrote). :class:`RunLayout` is that contract in one place, so a chapter cannot misspell a
path and a reader can see here who writes what::

    runs/NAME/
      manifest.json          dem run: parameters, provenance, one record per step
      chapters/NN.json       NN: the chapter finished, with the settings it ran with
      metrics.json           06: test scores, averages and costs per method, the swap experiment
      report/                dem run: the executed chapters as Markdown (dem publish)
      notebooks/NN_*.ipynb   dem run: the executed chapters
      models/base            02: θ0 (the tiny pretrained base or the named model)
      models/ft/<source>     02 (and 06's swap): one fine-tune per source
      models/dmix/<label>    05: one fine-tune per mixture ratio
      models/dem             04: the DEM model written by the streaming merge
      vectors/<source>       03 (and 06's swap): distribution vectors v_i = θ_i − θ0
      tables/*.csv|json|txt  every number behind the figures (see TABLES)
      figures/*.png          the figures (see FIGURES)
"""

from __future__ import annotations

from pathlib import Path

from dem import DemError

# Table name -> file suffix, with the chapter that writes it and the chapters that read it.
TABLES = {
    "01_length_stats": ".csv",  # 01: token lengths and padding fraction per source
    "02_finetune_costs": ".csv",  # 02 -> 06: cost record of each per-source fine-tune
    "02_individual_test": ".csv",  # 02 -> 06: test scores of θ0 and each fine-tune
    "03_layer_norms": ".csv",  # 03: ‖v_i‖ per layer group
    "03_cosine_similarity": ".csv",  # 03
    "03_sign_agreement": ".csv",  # 03
    "03_relative_norms": ".csv",  # 03 -> 06: ‖v_i‖ / ‖θ0‖
    "03_straight_path": ".csv",  # 03: validation loss along θ0 + t·v_i
    "03_between_fine_tunes": ".csv",  # 03: validation loss along θ_i -> θ_j
    "03_barriers": ".csv",  # 03 -> 06: the rise of that loss above the line between its ends
    "03_merge_gaps": ".csv",  # 03 -> 06: best loss on that path minus the two experts' loss
    "04_dem_trials": ".csv",  # 04: every candidate of the DEM weight search
    "04_landscape": ".csv",  # 04: the objective over two sources' weights
    "04_dem_gradient_trials": ".csv",  # 04: the gradient search's scored candidates
    "04_dem_gradient_path": ".csv",  # 04: its steps: minibatch loss and weights
    "04_dem_layer_trials": ".csv",  # 04: the same with one weight per source and block of layers
    "04_dem_layer_path": ".csv",
    "04_dem_adamerging_trials": ".csv",  # 04: per-layer weights trained as AdaMerging does
    "04_dem_adamerging_path": ".csv",
    "04_dem_tpe_trials": ".csv",  # 04: Optuna's TPE sampler, as many candidates as the grid
    "04_mde_trials": ".csv",  # 04: the output ensemble's weight search
    "04_merge_test": ".csv",  # 04 -> 06: test scores of DEM and the merging baselines
    "04_merge_settings": ".json",  # 04 -> 05, 06: DEM's weights, λs, the searches' costs (records)
    "05_dmix_costs": ".csv",  # 05 -> 06: cost record of each DMix run
    "05_dmix_test": ".csv",  # 05 -> 06: test scores of each DMix run
    "05_dmix": ".json",  # 05 -> 06: the DMix runs; which is uniform, best, DEM-guided (records)
    "05_dmix_dem_guided_cost": ".csv",  # 05 -> 06: cost of the DMix run at DEM's weights
    "06_results": ".csv",  # 06: metrics.json as a table
    "06_claims": ".csv",  # 06: the paper's claims, checked on this run
    "06_swap_cost": ".csv",  # 06: what replacing one source costs each recipe
    "06_heldout": ".csv",  # 06 -> dem evaluate --run: each saved model on tasks no source trained on
}
FIGURES = (
    "01_lengths",
    "02_train_loss",
    "02_val_loss",
    "02_individual_accuracy",
    "03_layer_norms",
    "03_cosine",
    "03_sign_agreement",
    "03_straight_path",
    "03_between_fine_tunes",
    "04_landscape",
    "04_gradient_paths",
    "04_layer_weights",
    "05_dmix_accuracy",
    "06_scores_by_method",
    "06_cost_vs_quality",
)
# The training curve a training run leaves in its model folder (dem.training.runs writes it).
TRAIN_LOG = "train_log.csv"
# The provenance record the streaming merge leaves in its output (dem.merging.merge writes it).
MERGE_RECORD = "dem_merge.json"


class RunLayout:
    """The paths of one run folder; nothing is created until a writer writes."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    # --- the run as a whole
    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def chapter_record(self, chapter: str) -> Path:
        """Written when chapter ``chapter`` (``"02"``) finishes; later chapters check it."""
        return self.root / "chapters" / f"{chapter}.json"

    def executed_notebook(self, name: str) -> Path:
        """The executed copy of chapter ``name`` (``NN_title.ipynb``)."""
        return self.notebooks / name

    # --- models and vectors
    @property
    def base(self) -> Path:
        """θ0, the model every fine-tune starts from and every merge adds to."""
        return self.root / "models" / "base"

    def ft_model(self, source: str) -> Path:
        """The fine-tune of the base on one source."""
        return self.root / "models" / "ft" / source

    def train_log(self, source: str) -> Path:
        """The training curve of the fine-tune on ``source``."""
        return self.ft_model(source) / TRAIN_LOG

    def dmix_model(self, label: str) -> Path:
        """The fine-tune on one mixture of the sources (``label`` names its ratios)."""
        return self.root / "models" / "dmix" / label

    @property
    def dem_model(self) -> Path:
        """The DEM model written by the streaming merge with the searched weights."""
        return self.root / "models" / "dem"

    @property
    def dem_merge_record(self) -> Path:
        return self.dem_model / MERGE_RECORD

    def vector(self, source: str) -> Path:
        """The distribution vector v = θ_source − θ0."""
        return self.root / "vectors" / source

    # --- tables and figures
    @property
    def tables(self) -> Path:
        return self.root / "tables"

    def table(self, name: str) -> Path:
        """``tables/<name>.<suffix>`` for a table listed in :data:`TABLES`."""
        return self.tables / f"{_listed(name, TABLES, 'table')}{TABLES[name]}"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def figure(self, name: str) -> Path:
        """``figures/<name>.png`` for a figure listed in :data:`FIGURES`."""
        return self.figures / f"{_listed(name, FIGURES, 'figure')}.png"


def _listed(name: str, known, what: str) -> str:
    """``name`` if the run folder's contract lists it; a misspelt name is refused here, once."""
    if name not in known:
        raise DemError(f"unknown {what} {name!r}; the run folder holds {', '.join(known)}")
    return name
