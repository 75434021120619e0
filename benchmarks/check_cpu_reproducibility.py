"""Do fine-tunes and DMix runs reproduce bit for bit on another CPU? Stand-ins for other CPUs.

    python benchmarks/check_cpu_reproducibility.py

torch picks its vector kernels by the CPU's instruction set; ATEN_CPU_CAPABILITY forces a
lower one, as an older CPU would run. Each capability trains, in a fresh process with one
thread, three one-source fine-tunes and one DMix run (1:1:1) of the tiny base for 16 steps,
and prints each weights file's sha256; a second run with two threads checks thread count.

Measured on the 2-core Xeon (AVX512) this project is developed on, torch 2.13 CPU:

    AVX512   arithmetic b703cc91c72f word_edit efa2f46708f3 facts f0b5cffd28fb dmix 995685186fae
    DEFAULT  arithmetic 3b5a77c30604 word_edit 53c7e9e35081 facts 5b8f97ae1229 dmix 835744049196
    AVX2     arithmetic edab9ab71431 word_edit 090b75162f24 facts 31b68a3de6b1 dmix ee468ce4c1cf

Every run, DMix or not, changes in the last bits with the instruction set (the kernels sum in
another order); 1 and 2 threads gave identical bits for both kinds. Data order is not a cause
(the schedule is a pure function of the run's parameters, dem/training/schedule.py). So two
machines agree bit for bit only at the same instruction set; otherwise validation accuracy
can move by an example and a near tie between ratios can go the other way. The choice itself
is deterministic: dem.chapters.experiments.choose_mixture breaks exact ties (and means differing only
by summation rounding) by the grid's order.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "arithmetic": {"arithmetic": 1.0},
    "word_edit": {"word_edit": 1.0},
    "facts": {"facts": 1.0},
    "dmix": {"arithmetic": 1.0, "word_edit": 1.0, "facts": 1.0},
}


def train_all(folder: Path, threads: int) -> str:
    """One line: the CPU capability and each run's weights hash (called in a child process)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from _helpers_train import make_base

    from dem.training.finetune import finetune

    torch.set_num_threads(threads)
    base = make_base(folder / "base")
    settings = dict(steps=16, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=8, max_length=48,
                    source_kwargs={"seed": 0, "n_train": 64, "n_validation": 16}, progress=False)  # fmt: skip
    line = [torch.backends.cpu.get_cpu_capability()]
    for name, mixture in RUNS.items():
        finetune(base, folder / name, mixture=mixture, **settings)
        digest = hashlib.sha256((folder / name / "model.safetensors").read_bytes()).hexdigest()
        line += [name, digest[:12]]
    return " ".join(line)


def main() -> None:
    for capability, threads in (("", 1), ("", 2), ("default", 1), ("avx2", 1)):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        with tempfile.TemporaryDirectory() as d:
            code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
                    f"import check_cpu_reproducibility as c; print(c.train_all(__import__('pathlib')"
                    f".Path({d!r}), {threads}))")  # fmt: skip
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True, cwd=ROOT).stdout  # fmt: skip
        print(f"threads {threads}: {out.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
