import os

# Headless figures, and one torch thread: on 2-core machines one thread is several times
# faster than two for the small tensors the tests use (see ../shared/OFFLINE.md).
os.environ.setdefault("MPLBACKEND", "agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# dem merge caches input hashes under $DEM_CACHE_DIR (default ~/.cache/dem): keep tests out of $HOME.
if "DEM_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DEM_CACHE_DIR"] = tempfile.mkdtemp(prefix="dem-test-cache-")

import torch  # noqa: E402

torch.set_num_threads(1)


def dem_run(params, out):
    """``python -m dem run --params PARAMS --out OUT`` headless, as CI runs it; the result."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "dem", "run", "--params", str(params), "--out", str(out)]
    env = {**os.environ, "MPLBACKEND": "agg"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


# Fixtures several test modules share (one copy, not one per module).
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    """The character-level tiny tokenizer."""
    from _helpers_data import tokenizer

    return tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base model folder for training tests (built once per module)."""
    from _helpers_train import make_base

    return make_base(tmp_path_factory.mktemp("base") / "base")


# Longest first (with --no-loadscope-reorder, which keeps this order; xdist's own puts files
# with more tests first): with one file per worker the SmolLM2 smoke run, about half of CI's
# time, starts at once on one worker, ahead of its file's quick tests, so that worker is not
# handed another file until it is done (xdist tops a worker up once 2 or fewer of its tests
# are left); the other worker takes the rest meanwhile.
LONGEST_FILES = ("test_real_model.py", "test_sweep.py", "test_notebooks.py", "test_install.py")
LONGEST_TEST = "test_smollm2_smoke_parameters_run_end_to_end"


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        file = LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)
        return file, item.name != LONGEST_TEST

    items.sort(key=rank)  # stable: every other test keeps its order in its file
