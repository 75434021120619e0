"""Benchmark: `dem merge` against mergekit and against the I/O floor, on a ~220M-parameter Llama.

Builds (once, cached in benchmarks/out/bench_merge/models) a random fp32 Llama base and three
perturbed "fine-tunes" (4 × 0.9 GB), then times, as subprocesses under /usr/bin/time,
interleaved, ``--repeats`` times each:

- ``floor``: reading every input file once (memory-mapped, no copy) and writing an output of
  the output's size: what no merge tool can beat;
- ``dem``: ``dem merge`` (task arithmetic, or ``--method ties``), hashing every input for
  dem_merge.json;
- ``mergekit``: mergekit-yaml with the same merge, in float32.

Each runs ``cold`` (the inputs dropped from the page cache with posix_fadvise, and dem's digest
cache empty: a first merge) and then ``warm`` (inputs cached, digests cached: the steady state
of a weight search). Reports median wall time, peak RSS and CPU time, the ratios dem/mergekit
and dem/floor, and checks that the two tools' outputs agree within 1e-6.

    OMP_NUM_THREADS=1 python benchmarks/bench_merge.py --mergekit /work/mk-venv/bin/mergekit-yaml --repeats 3

mergekit is optional and never a dependency of this project: install it in its own venv
(`python -m venv --system-site-packages mk && mk/bin/pip install mergekit`) and pass its
`mergekit-yaml`; without it dem is timed against the floor only.
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
    import torch
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


def evict(files: list[Path]) -> None:
    """Drop the files from the page cache, so the next read comes from the disk (no root needed)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io_floor(out: Path, nbytes: int, files: list[Path]) -> None:
    """Read every input once, write ``nbytes`` to ``out``: the work any merge must do.

    Inputs are read the cheapest way there is, mapped and faulted in 16 MiB at a time
    (MADV_POPULATE_READ: no copy; cold, about twice as fast as ``readinto`` here), and the
    output written from one 16 MiB buffer.
    """
    import mmap

    step = 16 << 20
    for file in files:
        with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for lo in range(0, len(mm), step):
                n = min(step, len(mm) - lo)
                mm.madvise(getattr(mmap, "MADV_POPULATE_READ", 22), lo, n)
                mm.madvise(mmap.MADV_DONTNEED, lo, n)
    view = memoryview(bytearray(step))
    with open(out, "wb", buffering=0) as f:
        for lo in range(0, nbytes, step):
            f.write(view[: min(step, nbytes - lo)])
    out.unlink()


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


def ties_at_threshold(models: list[Path], a: Path, b: Path, density: float) -> tuple[int, int]:
    """(entries where two TIES outputs differ by > 1e-6, how many of those are NOT entries whose
    |v_i| equals model i's trim threshold). Where magnitudes tie at the threshold, which of them
    mergekit keeps is whatever torch's unstable argsort returns; dem keeps the earliest."""
    import torch
    from safetensors import safe_open

    def tensor(folder: Path, name: str) -> torch.Tensor:
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                if name in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                    return f.get_tensor(name)
        raise KeyError(name)

    with safe_open(models[0] / "model.safetensors", "pt") as f:
        names = list(f.keys())
    differ = unexplained = 0
    for name in names:
        base = tensor(models[0], name)
        diff = (tensor(a, name) - tensor(b, name)).abs() > 1e-6
        if not diff.any():
            continue
        at_threshold = torch.zeros_like(diff)
        for model in models[1:]:
            v = (tensor(model, name) - base).abs().flatten()
            k = max(1, int(density * v.numel()))
            at_threshold |= (v == torch.kthvalue(v, v.numel() - k + 1).values).view(diff.shape)
        differ += int(diff.sum())
        unexplained += int((diff & ~at_threshold).sum())
    return differ, unexplained


def _mergekit_config(path: Path, method: str, base: Path, fts: list[Path], density: float) -> None:
    per_model = {"density": density} if method == "ties" else {}
    config = {  # JSON is YAML
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(p), "parameters": {"weight": w, **per_model}}
            for p, w in zip(fts, WEIGHTS, strict=True)
        ],  # fmt: skip
        "parameters": {"normalize": method == "ties"},
        "dtype": "float32",
    }
    path.write_text(json.dumps(config, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                    help="path of mergekit-yaml (default: the one on PATH, if any)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3, help="runs per tool and state, interleaved")
    ap.add_argument("--method", choices=["task_arithmetic", "ties"], default="task_arithmetic")
    ap.add_argument("--density", type=float, default=0.5, help="TIES density")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench_merge", help="work folder")
    ap.add_argument("--tiny", action="store_true", help="tiny models (a smoke test of this script)")
    ap.add_argument("--io-floor", nargs="+", help=argparse.SUPPRESS)  # OUT NBYTES FILE...: internal
    args = ap.parse_args()
    if args.io_floor:
        out, nbytes, *files = args.io_floor
        return io_floor(Path(out), int(nbytes), [Path(f) for f in files])
    import torch  # not before: the floor's process must not pay for importing it

    torch.set_num_threads(1)
    if args.tiny:  # keep the smoke test apart from the real measurement
        args.out = args.out / "tiny"
    models = build_models(args.out / "models", tiny=args.tiny)
    base, fts = models[0], models[1:]
    inputs = [f for m in models for f in sorted(m.glob("*.safetensors"))]
    out_bytes = (base / "model.safetensors").stat().st_size
    outs = {tool: args.out / f"merged_{tool}" for tool in ("floor", "dem", "mergekit")}
    extra = ["--method", args.method] + (
        ["--density", str(args.density)] if args.method == "ties" else []
    )
    cmds = {
        "floor": [sys.executable, __file__, "--io-floor", str(outs["floor"]), str(out_bytes),
                  *map(str, inputs)],
        "dem": [sys.executable, "-m", "dem", "merge", "--base", str(base), "--no-progress",
                *[a for p, w in zip(fts, WEIGHTS, strict=True) for a in ("--model", f"{p}={w}")],
                *extra, "--out", str(outs["dem"])],
    }  # fmt: skip
    if args.mergekit and Path(args.mergekit).exists():
        config = args.out / f"mergekit_{args.method}.yml"
        _mergekit_config(config, args.method, base, fts, args.density)
        cmds["mergekit"] = [args.mergekit, str(config), str(outs["mergekit"]),
                            "--no-copy-tokenizer", "--quiet"]  # fmt: skip
    else:
        print(f"mergekit-yaml not found ({args.mergekit}): timing dem and the I/O floor only; "
              "pass --mergekit PATH to compare", flush=True)  # fmt: skip
    digests = args.out / "digest-cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEM_CACHE_DIR": str(digests)}

    results: dict[str, list[tuple[float, float, float]]] = {}
    for r in range(args.repeats):
        tools = list(cmds)
        tools = tools[r % len(tools) :] + tools[: r % len(tools)]  # rotate who goes first
        for tool in tools:
            for state in ("cold", "warm"):
                shutil.rmtree(outs[tool], ignore_errors=True)
                if state == "cold":
                    shutil.rmtree(digests, ignore_errors=True)
                    evict(inputs)
                row = run(cmds[tool], args.out, env)
                results.setdefault(f"{tool} {state}", []).append(row)
                wall, rss, cpu = row
                print(f"run {r + 1} {tool:8s} {state}  wall {wall:6.2f} s  peak RSS {rss:7.0f} MB"
                      f"  cpu {cpu:6.2f} s", flush=True)  # fmt: skip

    med = {
        k: tuple(statistics.median(x) for x in zip(*rows, strict=True))
        for k, rows in results.items()
    }
    print(
        f"\n{'tool':16s} {'median wall s':>14s} {'min wall s':>11s} {'peak RSS MB':>12s} {'cpu s':>7s}"
    )
    for key, (wall, rss, cpu) in med.items():
        print(
            f"{key:16s} {wall:14.2f} {min(w for w, _, _ in results[key]):11.2f} {rss:12.0f} {cpu:7.2f}"
        )
    ratios = {}
    for state in ("cold", "warm"):
        dem = med[f"dem {state}"][0]
        ratios[f"dem/floor {state}"] = dem / med[f"floor {state}"][0]
        if "mergekit" in cmds:
            ratios[f"dem/mergekit {state}"] = dem / med[f"mergekit {state}"][0]
    summary = {"method": args.method, "repeats": args.repeats, "runs": results, "medians": med,
               "ratios": ratios}  # fmt: skip
    print("\n" + "  ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()))
    print("goals: dem/mergekit cold <= 0.3x, dem/floor cold <= 1.5x")
    if "mergekit" in cmds:
        summary["max_abs_diff"] = diff = max_abs_diff(outs["dem"], outs["mergekit"])
        print(f"max |dem - mergekit| = {diff:.3g} (goal <= 1e-6)")
        if args.method == "ties" and diff > 1e-6:
            differ, unexplained = ties_at_threshold(models, outs["dem"], outs["mergekit"],
                                                    args.density)  # fmt: skip
            summary["ties_differ"], summary["ties_unexplained"] = differ, unexplained
            print(f"{differ} entries differ; {unexplained} of them are not magnitude ties at a "
                  "trim threshold (where mergekit's pick among equals is arbitrary)")  # fmt: skip
        summary["rss_ratio_warm"] = med["dem warm"][1] / med["mergekit warm"][1]
    (args.out / f"bench_merge_{args.method}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
