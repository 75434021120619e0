"""Mergeability probe: is a base + fine-tuning recipe in the regime where DEM can work?

Measures, before building a whole run on a recipe, what issue 11 asked to measure first: each
fine-tune's relative move ‖vᵢ‖/‖θ0‖, the individuals on every source, every pair of vectors at
weight 1 and the sum of all at 0.5, 0.75 and 1 (validation accuracy / loss, 100 examples per
source). It is how the default's recipe (data/bases/tiny-knowledge, lr 2e-4, 200 steps x 16)
was chosen; the figures are in notebooks/params/default.yaml. Example (about 3 minutes):

    python benchmarks/probe_regime.py --base dem:tiny-knowledge --lr 2e-4 --steps 200 \\
        --batch-size 16 --out /tmp/probe
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from dem.evaluation.evaluate import evaluate
from dem.models import load_model
from dem.search.weights import InMemoryMerge
from dem.sources import get_source
from dem.training.finetune import finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="dem:tiny-knowledge")
    parser.add_argument("--sources", nargs="+",
                        default=["arithmetic", "arithmetic_cot", "word_edit", "facts"])  # fmt: skip
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=0)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--out", required=True, help="folder for the fine-tunes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = args.sources
    t0 = time.perf_counter()
    folders = {}
    for name in names:
        folders[name] = f"{args.out}/{name}"
        finetune(args.base, folders[name], mixture={name: 1.0}, steps=args.steps,
                 batch_size=args.batch_size, lr=args.lr, warmup_steps=min(30, args.steps // 5),
                 eval_every=args.steps, lora_r=args.lora_r, progress=False, replace=True)  # fmt: skip
    model, tokenizer = load_model(args.base)
    model.eval()
    sources = [get_source(n) for n in names]

    def scores(label: str) -> None:
        table = evaluate(model, tokenizer, sources, "validation", metrics=("accuracy", "loss"),
                         max_examples=args.examples)  # fmt: skip
        acc = table[table.metric == "accuracy"].set_index("source")["value"]
        loss = table[table.metric == "loss"].set_index("source")["value"]
        cells = "  ".join(f"{n}={acc[n]:.2f}/{loss[n]:.2f}" for n in names)
        print(f"{label:<34} {cells}  average={acc[names].mean():.3f}", flush=True)

    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    vectors = {}
    for name in names:
        tuned, _ = load_model(folders[name])
        vectors[name] = {n: p.detach() - base[n] for n, p in tuned.named_parameters()}
    norm0 = torch.sqrt(sum((p.double() ** 2).sum() for p in base.values()))
    for name in names:
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in vectors[name].values()))
        print(f"‖v‖/‖θ0‖ {name}: {float(norm / norm0):.4f}")
    print("validation accuracy/loss per source:")
    merger = InMemoryMerge(model, vectors)
    scores("base")
    for name in names:
        merger.apply({n: float(n == name) for n in names})
        scores(f"individual {name}")
    for a, b in itertools.combinations(names, 2):
        merger.apply({n: float(n in (a, b)) for n in names})
        scores(f"pair {a} + {b}")
    for w in (1.0, 0.75, 0.5):
        merger.apply(dict.fromkeys(names, w))
        scores(f"all at {w}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
