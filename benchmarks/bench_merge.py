"""Benchmark: `dem merge` against mergekit's task_arithmetic on a random ~220M-parameter Llama.

Builds (once, cached in benchmarks/out/bench_merge/models) a random fp32 Llama base and three
perturbed "fine-tunes", then runs the same merge, θ0 + Σ w_i (θ_i − θ0) in float32, with both
tools as subprocesses, interleaved, several times; reports median wall time, peak RSS (from
/usr/bin/time) and CPU time, and checks the outputs agree within 1e-6. `dem merge` is timed
twice: "dem" with the inputs' sha256 digests already cached (the steady state of a weight
search, which merges the same inputs many times) and "dem-hashing" with an empty digest
cache, so it also hashes all ~3.5 GB of inputs for dem_merge.json.

    python benchmarks/bench_merge.py --mergekit /work/mk-venv/bin/mergekit-yaml --repeats 5

mergekit is optional and never a dependency of this project: install it in its own venv
(`python -m venv --system-site-packages mk && mk/bin/pip install mergekit`) and pass its
`mergekit-yaml`; without it only `dem merge` is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
WEIGHTS = [0.6, 0.3, 0.4]  # arbitrary, deliberately not summing to 1 (normalize: false)
# ~220M parameters: the size the issue quotes mergekit's 14-19 s and 4.7-5.0 GB for
LLAMA = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=16,
    tie_word_embeddings=False,
)


def build_models(folder: Path, tiny: bool = False) -> list[Path]:
    """Random base + 3 perturbed copies as fp32 safetensors model folders (cached)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(LLAMA, vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2) if tiny else LLAMA  # fmt: skip
    names = ["base", "ft1", "ft2", "ft3"]
    paths = [folder / n for n in names]
    stamp = folder / "params.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    config = LlamaConfig(**params, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    base = {k: (torch.ones(s) if k.endswith("norm.weight") else 0.02 * torch.randn(s, generator=gen))
            for k, s in shapes.items()}  # fmt: skip
    for i, path in enumerate(paths):
        path.mkdir(parents=True)
        config.save_pretrained(path)
        weights = base if i == 0 else {k: t + 1e-3 * torch.randn(t.shape, generator=gen)
                                       for k, t in base.items()}  # fmt: skip
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        del weights
    n = sum(t.numel() for t in base.values())
    print(f"built {len(paths)} models of {n / 1e6:.0f}M parameters in {folder}", flush=True)
    stamp.write_text(json.dumps(params))
    return paths


def run(cmd: list[str], workdir: Path, env: dict | None = None) -> tuple[float, float, float]:
    """Run a command; return wall seconds, peak RSS in MB, CPU seconds (user + system).

    Peak RSS comes from /usr/bin/time, a tiny parent: Linux carries the high-water RSS of a
    process across fork/exec, so measuring children forked from this (large) Python process
    directly would report this process's memory instead of the tool's.
    """
    report = workdir / "time.txt"
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-o", str(report), "-f", "%M %U %S", *cmd],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    rss_kb, user, system = report.read_text().split()[-3:]
    return wall, int(rss_kb) / 1024, float(user) + float(system)


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        return {k: f for f in map(lambda p: safe_open(p, "pt"), sorted(folder.glob("*.safetensors")))
                for k in f.keys()}  # fmt: skip

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        raise SystemExit(f"outputs differ in tensor names: {sorted(set(ta) ^ set(tb))[:5]}")
    return max((ta[k].get_tensor(k) - tb[k].get_tensor(k)).abs().max().item() for k in ta)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--mergekit",
        default=shutil.which("mergekit-yaml"),
        help="path of mergekit-yaml (default: the one on PATH, if any)",
    )
    ap.add_argument("--repeats", type=int, default=5, help="runs per tool, interleaved")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_merge", help="work folder")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of this script)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.tiny:  # keep the smoke test apart from the real measurement
        args.out = args.out / "tiny"
    models = build_models(args.out / "models", tiny=args.tiny)
    base, fts = models[0], models[1:]

    outs = {
        "dem": args.out / "merged_dem",
        "dem-hashing": args.out / "merged_dem_hashing",
        "mergekit": args.out / "merged_mergekit",
    }
    dem_cmd = [
        sys.executable,
        "-m",
        "dem",
        "merge",
        "--base",
        str(base),
        "--no-progress",
        *[a for p, w in zip(fts, WEIGHTS, strict=True) for a in ("--model", f"{p}={w}")],
    ]
    # dem records each input's sha256 in dem_merge.json and caches digests by stat data: "dem"
    # is the steady state of a weight search (digests cached by an untimed warm-up run);
    # "dem-hashing" starts from an empty cache every run, so it hashes all inputs too
    cmds = {
        "dem": [*dem_cmd, "--out", str(outs["dem"])],
        "dem-hashing": [*dem_cmd, "--out", str(outs["dem-hashing"])],
    }
    if args.mergekit and Path(args.mergekit).exists():
        config = args.out / "mergekit_task_arithmetic.yml"
        config.write_text(
            json.dumps(
                {  # JSON is YAML
                    "merge_method": "task_arithmetic",
                    "base_model": str(base),
                    "models": [
                        {"model": str(p), "parameters": {"weight": w}}
                        for p, w in zip(fts, WEIGHTS, strict=True)
                    ],
                    "parameters": {"normalize": False},
                    "dtype": "float32",
                },
                indent=2,
            )
        )
        cmds["mergekit"] = [
            args.mergekit,
            str(config),
            str(outs["mergekit"]),
            "--no-copy-tokenizer",
            "--quiet",
        ]
    else:
        print(
            f"mergekit-yaml not found ({args.mergekit}): timing dem merge only; "
            "pass --mergekit PATH to compare",
            flush=True,
        )
    warm_cache, cold_cache = args.out / "hash-cache", args.out / "hash-cache-cold"
    env = {
        "dem": {**os.environ, "DEM_CACHE_DIR": str(warm_cache)},
        "dem-hashing": {**os.environ, "DEM_CACHE_DIR": str(cold_cache)},
        "mergekit": None,
    }
    shutil.rmtree(outs["dem"], ignore_errors=True)
    run(cmds["dem"], args.out, env["dem"])  # warm-up: fills the digest cache and the page cache

    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cmds}
    for r in range(args.repeats):
        order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]  # alternate who goes first
        for tool in order:
            shutil.rmtree(outs[tool], ignore_errors=True)
            shutil.rmtree(cold_cache, ignore_errors=True)
            results[tool].append(run(cmds[tool], args.out, env[tool]))
            wall, rss, cpu = results[tool][-1]
            print(
                f"run {r + 1} {tool:12s} wall {wall:6.2f} s  peak RSS {rss:7.0f} MB  cpu {cpu:6.2f} s",
                flush=True,
            )

    print(
        f"\n{'tool':12s} {'median wall s':>14s} {'min wall s':>11s} {'median RSS MB':>14s} {'median cpu s':>13s}"
    )
    med = {}
    for tool, rows in results.items():
        walls, rsss, cpus = zip(*rows, strict=True)
        med[tool] = (statistics.median(walls), statistics.median(rsss), statistics.median(cpus))
        print(
            f"{tool:12s} {med[tool][0]:14.2f} {min(walls):11.2f} {med[tool][1]:14.0f} {med[tool][2]:13.2f}"
        )
    summary = {"repeats": args.repeats, "runs": results, "medians": med}
    if "mergekit" in med:
        diff = max_abs_diff(outs["dem"], outs["mergekit"])
        print(f"\nmax |dem - mergekit| = {diff:.3g} (goal <= 1e-6); goal: dem <= 0.5x mergekit")
        summary["max_abs_diff"], summary["ratios"] = diff, {}
        for tool in ("dem", "dem-hashing"):
            ratios = [med[tool][i] / med["mergekit"][i] for i in range(3)]
            summary["ratios"][tool] = dict(zip(("wall", "rss", "cpu"), ratios, strict=True))
            print(
                f"{tool:12s} / mergekit: wall {ratios[0]:.2f}x, peak RSS {ratios[1]:.2f}x, cpu {ratios[2]:.2f}x"
            )
    (args.out / "bench_merge.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
