"""Check `dem merge` against mergekit, method by method, and against a float64 reference.

    # every deterministic method, dem vs mergekit, same parameters (tiny random Llamas):
    python benchmarks/check_merge_exact.py --mergekit /work/mk-venv/bin/mergekit-yaml
    # the same on your own models:
    python benchmarks/check_merge_exact.py --mergekit PATH --base B --model M1 --model M2 --model M3
    # dem merge on real fine-tunes vs float64, and the merged model talks:
    python benchmarks/check_merge_exact.py --run runs/smollm2-smoke

With ``--mergekit``, each method of :data:`COMPARISONS` is run by both tools with the same
parameters, in float32, and the largest absolute difference of any weight is reported; the
goal is <= 1e-6. Random methods (DARE, DELLA) draw different numbers in the two tools and are
not compared. Without it: dem's task arithmetic vs float64 (expected ~1e-7 relative), then
greedy generation with the merged model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from dem import models
from dem.merging import merge

WEIGHTS = [0.5, 0.3, 0.4]
# dem method -> (dem parameters, mergekit method, mergekit per-model parameters, shared ones);
# where mergekit's default differs from dem's convention it is set explicitly
COMPARISONS = {
    "dem": ({}, "task_arithmetic", {}, {"normalize": False}),
    "task_arithmetic": ({"lam": 0.7}, "task_arithmetic", {}, {"normalize": False, "lambda": 0.7}),
    "linear": ({}, "linear", {}, {"normalize": False}),
    "ties": ({"density": 0.3, "lam": 1.1}, "ties", {"density": 0.3},
             {"normalize": True, "lambda": 1.1}),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, "breadcrumbs",
                    {"density": 0.8, "gamma": 0.05}, {"normalize": False}),
    "breadcrumbs_ties": ({"density": 0.7, "gamma": 0.1, "lam": 0.9}, "breadcrumbs_ties",
                         {"density": 0.7, "gamma": 0.1}, {"normalize": False, "lambda": 0.9}),
    "model_stock": ({}, "model_stock", {}, {}),  # dem's weights are 1/N, mergekit's mean
    "slerp": ({}, "slerp", {}, {"t": 0.3}),  # dem's one weight is t
}  # fmt: skip


def _tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            index.update({k: (file, k) for k in f.keys()})  # noqa: SIM118 (safe_open has no iter)
    return index


def _get(entry: tuple[Path, str]) -> torch.Tensor:
    with safe_open(entry[0], framework="pt") as f:
        return f.get_tensor(entry[1])


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if set(ta) != set(tb):
        raise SystemExit(f"{a} and {b} differ in tensor names: {sorted(set(ta) ^ set(tb))[:5]}")
    return max(float((_get(ta[k]).double() - _get(tb[k]).double()).abs().max()) for k in ta)


def tiny_llamas(folder: Path, n: int = 3) -> tuple[Path, list[Path]]:
    """A random fp32 Llama (hidden 128) and n fine-tune stand-ins: base + 0.01·(shared + own)
    noise, so their vectors correlate (cosine ~0.5: Model Stock's t is not trivially 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "base")
    shared = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    for i in range(n):
        with torch.no_grad():
            tuned = LlamaForCausalLM.from_pretrained(folder / "base")
            for k, p in tuned.named_parameters():
                p.add_(0.01 * (shared[k] + torch.randn_like(p)))
        tuned.save_pretrained(folder / f"ft{i + 1}")
    return folder / "base", [folder / f"ft{i + 1}" for i in range(n)]


def compare_with_mergekit(mergekit: str, base: Path, fts: list[Path], work: Path) -> dict:
    """Run every comparison with both tools; {method: max |dem − mergekit|}."""
    results = {}
    for method, (params, mk_method, per_model, shared) in COMPARISONS.items():
        if method == "slerp":
            inputs, mk_models = (
                [(fts[0], shared["t"])],
                [{"model": str(base)}, {"model": str(fts[0])}],
            )
        else:
            w = [1 / len(fts)] * len(fts) if method == "model_stock" else WEIGHTS[: len(fts)]
            inputs = list(zip(fts, w, strict=True))
            mk_models = [{"model": str(p), "parameters": {"weight": x, **per_model}}
                         for p, x in inputs]  # fmt: skip
        ours = merge.merge(base, inputs, work / f"dem_{method}", method=method, progress=False,
                           overwrite=True, **params)  # fmt: skip
        config = {"merge_method": mk_method, "base_model": str(base), "models": mk_models,
                  "parameters": shared, "dtype": "float32"}  # fmt: skip
        if method == "linear":
            del config["base_model"]
        (work / f"{method}.yml").write_text(json.dumps(config))
        theirs = work / f"mergekit_{method}"
        proc = subprocess.run([mergekit, str(work / f"{method}.yml"), str(theirs), "--quiet",
                               "--no-copy-tokenizer"], capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            raise SystemExit(f"mergekit {mk_method} failed: {proc.stderr[-2000:]}")
        results[method] = max_abs_diff(ours, theirs)
        assert max_abs_diff(ours, base) > 1e-3, f"{method} left the base unchanged: no test"
        print(f"{method:18s} vs mergekit {mk_method:18s} max |diff| = {results[method]:.2e}",
              flush=True)  # fmt: skip
    return results


def check_float64(base: Path, inputs: list[tuple[Path, float]], prompt: str) -> None:
    """dem's task arithmetic vs float64, then a greedy answer from the merged model."""
    with tempfile.TemporaryDirectory() as tmp:
        out = merge.merge(base, inputs, Path(tmp) / "merged", progress=False)
        merged, reference_index = _tensors(out), _tensors(base)
        inputs_index = [(_tensors(p), w) for p, w in inputs]
        worst_abs = worst_rel = 0.0
        for name, entry in reference_index.items():
            theta_0 = _get(entry)
            if not theta_0.is_floating_point():
                continue
            ref = theta_0.double().clone()
            for index, w in inputs_index:
                ref += w * (_get(index[name]).double() - theta_0.double())
            diff = (_get(merged[name]).double() - ref).abs()
            worst_abs = max(worst_abs, float(diff.max()))
            worst_rel = max(worst_rel, float((diff / ref.abs().clamp_min(1e-3)).max()))
        print(f"{len(reference_index)} tensors, {len(inputs)} inputs: max |merged - float64| = "
              f"{worst_abs:.3e}, max relative = {worst_rel:.3e}")  # fmt: skip
        model, tokenizer = models.load_model(str(out))
        from dem.evaluation.evaluate import greedy_generate
        from dem.sources.data import encode_prompts

        ids = encode_prompts(tokenizer, [prompt])
        generated = greedy_generate(model, ids, 24, tokenizer.eos_token_id, tokenizer.pad_token_id)
        print("prompt:", prompt)
        print("merged model says:", tokenizer.decode(generated[0], skip_special_tokens=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", help="mergekit-yaml: compare every deterministic method")
    parser.add_argument("--run", type=Path, help="a dem run folder: its base and fine-tunes")
    parser.add_argument("--base", type=Path)
    parser.add_argument(
        "--model", action="append", default=[], help="PATH=WEIGHT (PATH with --mergekit)"
    )
    parser.add_argument("--prompt", default="What is 12 + 30? Answer with a number.")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mergekit:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if args.base:
                base, fts = args.base, [Path(m.rsplit("=", 1)[0]) for m in args.model]
            else:
                base, fts = tiny_llamas(work / "models")
            results = compare_with_mergekit(args.mergekit, base, fts, work)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
        print(f"worst: {max(results.values()):.2e} (goal <= 1e-6)")
        return
    if args.run:
        base = args.run / "models" / "base"
        fts = sorted(p for p in (args.run / "models" / "ft").iterdir() if p.is_dir())
        inputs = [(p, 1.0 / len(fts)) for p in fts]
    else:
        base = args.base
        inputs = [(Path(m.rsplit("=", 1)[0]), float(m.rsplit("=", 1)[1])) for m in args.model]
    check_float64(base, inputs, args.prompt)


if __name__ == "__main__":
    main()
