"""Data-parallel fine-tuning: `torchrun --nproc_per_node 2 -m dem finetune` on CPU (gloo) gives
the loss curve of one process at the same global batch, and one finished model folder.

Global batch B = 8 both ways: two processes each take one micro-batch of 4 per step; one process
takes the same two micro-batches of 4 by gradient accumulation. The schedule is a function of
(steps x accumulation x processes, micro-batch size, seed), so both see the same examples in the
same micro-batches, and the loss is normalised by the step's global count of response tokens in
both (dem.training.loop), so the optimisation is the same computation.

Tolerance: 1e-6 relative on every logged loss. What can differ is float32 rounding in the
gradient sum: DDP all-reduces world x the per-process gradients and divides by world, where
accumulation adds them into .grad. For two processes that is exact (x2 and /2 are exact, a sum of
two terms does not depend on order) and the curves were measured bitwise equal; 1e-6 (a few
float32 ulps over a dozen Adam steps) would still pass a reduction order that other backends
choose, while a different batch or a wrong normalisation moves the curve by far more: the same
run at half the global batch differs by 0.07 nats within 12 steps.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from _helpers_train import weights

from dem.cli import main

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch built without gloo",
)

RTOL = 1e-6
MICRO_BATCH = 4  # per process; x 2 processes = the global batch of 8


def _args(base, out, data: list[str], grad_accum: int) -> list[str]:
    return [
        "finetune", "--base", str(base), *data, "--out", str(out), "--steps", "12",
        "--batch-size", str(MICRO_BATCH), "--grad-accum", str(grad_accum), "--lr", "3e-3",
        "--warmup-steps", "2", "--eval-every", "4", "--max-length", "32", "--n-train", "64",
        "--n-validation", "32", "--threads", "1", "--device", "cpu", "--no-progress",
    ]  # fmt: skip


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on a free local port, so concurrent test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "dem", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "data",
    [["--source", "arithmetic"], ["--mixture", "arithmetic=0.5,word_edit=0.5"]],
    ids=["fine-tune", "dmix"],
)
def test_two_processes_follow_one_process_at_the_same_global_batch(base, tmp_path, data):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(base, one, data, grad_accum=2)) == 0
    proc = _torchrun(_args(base, two, data, grad_accum=1))
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = pd.read_csv(one / "train_log.csv"), pd.read_csv(two / "train_log.csv")
    assert list(a["step"]) == list(b["step"]) == list(range(1, 13))
    assert list(a["tokens"]) == list(b["tokens"])  # the same examples in every step
    val_columns = [c for c in a.columns if c.startswith("val_loss")]
    assert len(val_columns) == (3 if "--mixture" in data else 2)  # overall and per source
    for column in ["loss", *val_columns]:
        pd.testing.assert_series_equal(a[column], b[column], rtol=RTOL, atol=0)
    assert a["loss"].iloc[-1] < a["loss"].iloc[0] - 0.3  # it learned: the curve is not flat

    # One model folder, written once by the main process: no second copy, nothing unfinished.
    costs = [pd.read_json(f, typ="series") for f in (one / "cost.json", two / "cost.json")]
    assert (costs[0]["processes"], costs[1]["processes"]) == (1, 2)
    assert costs[0]["examples"] == costs[1]["examples"] == 12 * 2 * MICRO_BATCH
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert [p.name for p in two.glob("*.safetensors")] == ["model.safetensors"]
    assert not (two / "checkpoint").exists() and (two / "README.md").is_file()
    wa, wb = weights(one), weights(two)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=RTOL, atol=1e-7)
