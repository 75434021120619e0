"""Check `dem merge` on real fine-tunes against a float64 reference, and that the result talks.

    python benchmarks/check_merge_exact.py --run runs/smollm2-smoke            # a dem run folder
    python benchmarks/check_merge_exact.py --base B --model M1=0.5 --model M2=0.5

Merges with `dem merge` (fp32 arithmetic, streamed), recomputes θ0 + Σ w_i (θ_i − θ0) tensor by
tensor in float64, and reports the largest absolute and relative difference — expected at fp32
rounding (~1e-7 relative). Then greedy-generates an answer with the merged model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from dem import merge, models


def _tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    index = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            index.update({k: (file, k) for k in f.keys()})  # noqa: SIM118 (safe_open has no iter)
    return index


def _get(entry: tuple[Path, str]) -> torch.Tensor:
    with safe_open(entry[0], framework="pt") as f:
        return f.get_tensor(entry[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a dem run folder: its base and fine-tunes")
    parser.add_argument("--base", type=Path)
    parser.add_argument("--model", action="append", default=[], help="PATH=WEIGHT")
    parser.add_argument("--prompt", default="What is 12 + 30? Answer with a number.")
    args = parser.parse_args()
    if args.run:
        base = args.run / "models" / "base"
        fts = sorted(p for p in (args.run / "models" / "ft").iterdir() if p.is_dir())
        inputs = [(p, 1.0 / len(fts)) for p in fts]
    else:
        base = args.base
        inputs = [(Path(m.rsplit("=", 1)[0]), float(m.rsplit("=", 1)[1])) for m in args.model]
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
        print(
            f"{len(reference_index)} tensors, {len(inputs)} inputs: max |merged - float64| = "
            f"{worst_abs:.3e}, max relative = {worst_rel:.3e}"
        )
        model, tokenizer = models.load_model(str(out))
        from dem.data import encode_prompts
        from dem.evaluate import greedy_generate

        ids = encode_prompts(tokenizer, [args.prompt])
        generated = greedy_generate(model, ids, 24, tokenizer.eos_token_id, tokenizer.pad_token_id)
        print("prompt:", args.prompt)
        print("merged model says:", tokenizer.decode(generated[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
