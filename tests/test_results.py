"""Chapter 06's accounting (dem.evaluation.results): costs per method, metrics.json, claims, read back from
a hand-made run folder whose every number is known."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dem import DemError
from dem.evaluation.results import (
    ChapterResults,
    build_metrics,
    claims,
    method_costs,
    metrics_table,
    scores_by_method,
    write_table,
)
from dem.layout import RunLayout
from dem.records import DMixRecord, MergeRecord, uniform_run

NAMES = ["a", "b"]
# Test accuracy per model and source (c is the composite source).
ACCURACY = {
    "base": {"a": 0.0, "b": 0.1, "c": 0.0},
    "individual/a": {"a": 0.9, "b": 0.1, "c": 0.2},
    "individual/b": {"a": 0.2, "b": 0.8, "c": 0.1},
    "dem": {"a": 0.88, "b": 0.7, "c": 0.5},
    "average": {"a": 0.5, "b": 0.5, "c": 0.3},
    "task_arithmetic": {"a": 0.6, "b": 0.6, "c": 0.3},
    "ties": {"a": 0.4, "b": 0.6, "c": 0.2},
    "dare": {"a": 0.5, "b": 0.4, "c": 0.2},
    "dmix_1-1": {"a": 0.7, "b": 0.7, "c": 0.4},
    "dmix_2-1": {"a": 0.8, "b": 0.6, "c": 0.4},
}


def _tidy(models: list[str]) -> pd.DataFrame:
    rows = [
        {"model": m, "source": s, "metric": metric, "value": v if metric == "accuracy" else 1 - v}
        for m in models
        for s, v in ACCURACY[m].items()
        for metric in ("loss", "accuracy")
    ]
    return pd.DataFrame(rows)


@pytest.fixture()
def layout(tmp_path):
    layout = RunLayout(tmp_path)
    write_table(
        _tidy(["base", "individual/a", "individual/b"]),
        layout.table("02_individual_test"),
        index=False,
    )
    write_table(
        _tidy(["dem", "average", "task_arithmetic", "ties", "dare"]),
        layout.table("04_merge_test"),
        index=False,
    )
    write_table(_tidy(["dmix_1-1", "dmix_2-1"]), layout.table("05_dmix_test"), index=False)
    ft = pd.DataFrame({"train_tokens": [100, 300], "wall_s": [1.0, 2.0]}, index=NAMES)
    write_table(ft, layout.table("02_finetune_costs"))
    dmix = pd.DataFrame(
        {"train_tokens": [400, 400], "wall_s": [3.0, 5.0]}, index=["dmix_1-1", "dmix_2-1"]
    )
    write_table(dmix, layout.table("05_dmix_costs"))
    _merge_record().save(layout)
    runs = {"dmix_1-1": {"a": 1.0, "b": 1.0}, "dmix_2-1": {"a": 2.0, "b": 1.0}}
    DMixRecord(runs=runs, uniform="dmix_1-1", best="dmix_2-1").save(layout)
    relative = pd.DataFrame({"source": NAMES, "relative": [0.01, 0.02]})
    write_table(relative, layout.table("03_relative_norms"), index=False)
    return layout


def _merge_record(**searches) -> MergeRecord:
    return MergeRecord(dem_weights={"a": 1.0, "b": 0.5}, lambdas={}, search={"wall_s": 0.25},
                       strategy="grid", metric="accuracy", ties_density=0.2, dare_drop_prob=0.5,
                       more_merges=[], searches=searches)  # fmt: skip


def test_costs_charge_dem_its_finetunes_and_search_and_dmix_its_whole_ratio_search(layout):
    chapters = ChapterResults.load(layout)
    assert chapters.dmix.best == "dmix_2-1" and chapters.dmix.uniform == "dmix_1-1"
    costs = method_costs(chapters, NAMES)
    assert list(costs) == [
        "base", "individual/a", "individual/b", "dem", "average", "task_arithmetic", "ties",
        "dare", "dmix_uniform", "dmix_best",
    ]  # fmt: skip
    assert costs["base"] == (0, 0)
    assert costs["individual/b"] == (300, 2.0)
    assert costs["dem"] == (400, 3.25)
    assert all(costs[m] == (400, 3.0) for m in ("average", "task_arithmetic", "ties", "dare"))
    assert costs["dmix_uniform"] == (400, 3.0)
    assert costs["dmix_best"] == (800, 8.0)


def test_searches_beyond_the_grid_pay_their_own_search_and_the_ensemble_its_inference(layout):
    tidy = pd.read_csv(layout.table("04_merge_test"))
    extra = tidy[tidy.model == "dem"].assign(model="mde")
    searched = [extra.assign(model=m) for m in ("dem_gradient", "dem_adamerging", "dem_tpe")]
    write_table(pd.concat([tidy, *searched, extra]), layout.table("04_merge_test"), index=False)
    _merge_record(
        dem_gradient={"wall_s": 0.5},
        dem_adamerging={"wall_s": 4.0},
        dem_tpe={"wall_s": 0.75},
        mde={"wall_s": 2.0, "forward_passes": 2},
    ).save(layout)
    chapters = ChapterResults.load(layout)
    costs = method_costs(chapters, NAMES)
    assert "dem_layer" not in costs  # not run: not reported
    assert costs["dem_gradient"] == (400, 3.5, 1)
    assert costs["dem_adamerging"] == (400, 7.0, 1) and costs["dem_tpe"] == (400, 3.75, 1)
    assert costs["mde"] == (400, 5.0, 2)
    metrics = build_metrics(chapters, NAMES, "c")
    assert metrics["methods"]["mde"]["cost"] == {"train_tokens": 400, "wall_s": 5.0,
                                                 "forward_passes": 2}  # fmt: skip
    assert metrics_table(metrics).loc["mde", "forward_passes"] == 2


def test_metrics_reports_each_method_on_its_own_model_and_the_cost_ratio(layout):
    chapters = ChapterResults.load(layout)
    metrics = build_metrics(chapters, NAMES, "c")
    assert metrics["sources"] == NAMES and metrics["composite_source"] == "c"
    assert metrics["dem_weights"] == {"a": 1.0, "b": 0.5}
    assert metrics["dmix_best_ratio"] == "dmix_2-1"
    assert metrics["cost_ratio_dmix_search_over_dem"] == 2.0
    dem = metrics["methods"]["dem"]
    assert dem["test"] == {"a": 0.88, "b": 0.7} and dem["composite"] == 0.5
    assert dem["average"] == pytest.approx(0.79)
    assert dem["cost"] == {"train_tokens": 400, "wall_s": 3.25, "forward_passes": 1}
    assert metrics["methods"]["dmix_best"]["test"] == {"a": 0.8, "b": 0.6}
    assert metrics["methods"]["dmix_uniform"]["test"] == {"a": 0.7, "b": 0.7}
    json.dumps(metrics)  # plain JSON types only: no numpy scalars written as strings
    assert build_metrics(chapters, NAMES, "")["methods"]["dem"]["composite"] is None
    assert metrics["vectors"] == {
        "relative_norm": {"a": 0.01, "b": 0.02},
        "barrier": None,
        "merge_gap": None,
    }
    barriers = pd.DataFrame({"pair": ["a → b"], "barrier": [0.5]})
    write_table(barriers, layout.table("03_barriers"), index=False)
    with_barriers = build_metrics(ChapterResults.load(layout), NAMES, "c")
    assert with_barriers["vectors"]["barrier"] == {"a → b": 0.5}
    table = metrics_table(metrics)
    assert list(table.index) == list(metrics["methods"])
    assert table.loc["dmix_best", "train_tokens"] == 800


def test_claims_are_computed_from_the_metrics_as_they_are(layout):
    metrics = build_metrics(ChapterResults.load(layout), NAMES, "c")
    checks = claims(metrics).set_index("claim")
    assert list(checks["holds"]) == [True, True, False, True, False, True]
    uniform = checks.loc["DEM average ≥ DMix uniform average (equal training budget)"]
    assert uniform["dem"] == pytest.approx(0.79) and uniform["reference"] == pytest.approx(0.7)
    composite = checks.loc["DEM on c above every individual model"]
    assert composite["dem"] == 0.5 and composite["reference"] == 0.2
    assert checks.loc["DEM average ≥ best DMix average", "reference"] == pytest.approx(0.7)
    cost = checks.loc["DEM training cost ≤ 1/3 of the DMix ratio search"]
    assert cost["dem"] == 400 and cost["reference"] == pytest.approx(800 / 3)
    own_b = checks.loc["DEM within 5 points of individual/b on b"]
    assert own_b["dem"] == 0.7 and own_b["reference"] == pytest.approx(0.75)


def test_scores_by_method_is_long_in_method_then_source_order(layout):
    chapters = ChapterResults.load(layout)
    metrics = build_metrics(chapters, NAMES, "c")
    long = scores_by_method(chapters, metrics)
    assert list(long.columns) == ["method", "source", "score"]
    assert len(long) == len(metrics["methods"]) * len(NAMES)
    best = long[long.method == "dmix_best"].set_index("source")["score"]
    assert best.to_dict() == {"a": 0.8, "b": 0.6}


def test_write_table_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "tables" / "t.csv"
    write_table(pd.DataFrame({"x": [1, 2]}), path, index=False)
    write_table(pd.DataFrame({"x": [3]}), path, index=False)
    assert path.read_text() == "x\n3\n"
    assert [p.name for p in path.parent.iterdir()] == ["t.csv"]


def test_dem_guided_dmix_pays_dems_finetunes_and_search_and_its_own_run(layout):
    tidy = pd.read_csv(layout.table("05_dmix_test"))
    guided = tidy[tidy.model == "dmix_2-1"].assign(model="dmix_dem_guided")
    write_table(pd.concat([tidy, guided]), layout.table("05_dmix_test"), index=False)
    with pytest.raises(DemError, match="scored but reported by no method: \\['dmix_dem_guided'\\]"):
        method_costs(ChapterResults.load(layout), NAMES)  # scored, but the record has no guided run
    cost = pd.DataFrame({"train_tokens": [400], "wall_s": [4.0]}, index=["dmix_dem_guided"])
    write_table(cost, layout.table("05_dmix_dem_guided_cost"))
    record = DMixRecord.load(layout)
    record.guided = "dmix_dem_guided"
    record.save(layout)
    chapters = ChapterResults.load(layout)
    # the fine-tunes (400 tokens, 3 s) and the grid search (0.25 s) gave its ratio; its run: 400, 4 s
    assert method_costs(chapters, NAMES)["dmix_dem_guided"] == (800, 7.25)
    assert chapters.dmix.uniform == "dmix_1-1"
    assert chapters.dmix_search_cost == (800, 8.0)  # the guided run is not one of the ratio search
    entry = build_metrics(chapters, NAMES, "c")["methods"]["dmix_dem_guided"]
    assert entry["test"] == {"a": 0.8, "b": 0.6}
    assert entry["cost"] == {"train_tokens": 800, "wall_s": 7.25, "forward_passes": 1}


def test_a_method_chapter_04_scored_is_reported_whatever_its_name(layout):
    tidy = pd.read_csv(layout.table("04_merge_test"))
    new = tidy[tidy.model == "ties"].assign(model="a_new_merge")
    write_table(pd.concat([tidy, new]), layout.table("04_merge_test"), index=False)
    metrics = build_metrics(ChapterResults.load(layout), NAMES, "c")
    assert metrics["methods"]["a_new_merge"]["cost"]["train_tokens"] == 400


def test_records_are_read_by_field_and_a_missing_one_names_its_chapter(layout, tmp_path):
    assert MergeRecord.load(layout).dem_weights == {"a": 1.0, "b": 0.5}
    with pytest.raises(DemError, match="run chapter 05 first"):
        DMixRecord.load(RunLayout(tmp_path / "empty"))
    assert uniform_run({"x": {"a": 2.0, "b": 1.0}, "y": {"a": 1.0, "b": 1.0}}) == "y"
    with pytest.raises(DemError, match="no uniform ratio"):
        uniform_run({"x": {"a": 2.0, "b": 1.0}})


def test_declared_tables_are_read_by_column_and_a_wrong_one_names_its_chapter(layout, tmp_path):
    from dem.records import SCHEMAS, read_table

    assert read_table(layout, "02_finetune_costs").loc["b", "train_tokens"] == 300
    assert read_table(layout, "03_barriers", optional=True) is None  # chapter 03 skipped paths
    with pytest.raises(DemError, match="03_barriers.csv is missing: run chapter 03 first"):
        read_table(layout, "03_barriers")
    # a table written without a column a later chapter reads: refused by name, not a KeyError
    write_table(pd.DataFrame({"source": NAMES, "norm": [1.0, 2.0]}),
                layout.table("03_relative_norms"), index=False)  # fmt: skip
    with pytest.raises(DemError, match="has no column relative: rerun chapter 03"):
        ChapterResults.load(layout)
    # every table chapter 06 reads is declared, with the chapter that writes it
    assert {name[:2] for name in SCHEMAS} == {"02", "03", "04", "05"}
