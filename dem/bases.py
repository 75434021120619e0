"""Bases: whatever names a base model -- ``dem:NAME``, ``package:MODULE/FILE``, a ``.gguf``
file, a model folder, a hub id -- made into one plain fp32 safetensors folder, once.

Every command and every chapter that starts from a base goes through :func:`prepare_base`, so
a base named the same way is the same model everywhere, and a GGUF (quantized, which
transformers cannot save) is dequantized once and cached rather than at every load.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

import dem
from dem import DemError
from dem.io import atomic_output_dir
from dem.models import _split_gguf, load_model, save_model, shipped_base


def prepare_base(
    source: str | Path,
    out_dir: str | Path,
    *,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    replace: bool = False,
) -> Path:
    """Turn a hub id, a model folder or a GGUF file into a plain fp32 safetensors base folder.

    GGUF loading dequantizes every tensor and takes tens of seconds for a 135M model, so it is
    done once here; later loads of ``out_dir`` take seconds. Cached: an ``out_dir`` made from
    the same source is reused (``dem_base.json`` records the source); ``replace`` rebuilds a
    base folder dem made from another source (``dem run`` after ``base_model`` changed).
    """
    import json

    out = Path(out_dir)
    record = {"source": str(source), "gguf_file": gguf_file}
    source = shipped_base(source)
    record_file = out / "dem_base.json"
    if out.exists() and not overwrite:
        try:
            previous = json.loads(record_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous == record:
            return out
        if not (replace and previous is not None):  # replace: only a base dem made itself
            raise DemError(
                f"base folder {out} exists and was not made from {source}"
                f"{f' ({gguf_file})' if gguf_file else ''}; choose another folder or pass overwrite"
            )
    folder, file = _split_gguf(str(source), gguf_file)
    if file is not None:
        # hard-link the cached conversion into out_dir (no extra disk)
        return _link_dir(_converted_gguf(Path(folder) / file, record, trust_remote_code), out)
    return _convert(str(source), gguf_file, out, record, trust_remote_code)


def resolve_base(
    source: str | Path, *, gguf_file: str | None = None, trust_remote_code: bool = False
) -> str:
    """The model folder (or hub id) to load for a base named as a chapter may name it.

    ``dem:NAME``: the shipped folder. ``package:MODULE/FILE.gguf``, a ``.gguf`` file, or a
    folder with ``gguf_file``: the plain fp32 folder :func:`prepare_base` converts it into,
    made once in dem's cache (a GGUF-loaded model is quantized and cannot be saved, so a
    fine-tune of it must start from the conversion). Folders and hub ids: unchanged.
    """
    folder, file = _split_gguf(str(source), gguf_file)
    if file is None:
        return folder
    record = {"source": str(source), "gguf_file": gguf_file}
    return str(_converted_gguf(Path(folder) / file, record, trust_remote_code))


def _converted_gguf(gguf: Path, record: dict, trust_remote_code: bool) -> Path:
    """Dequantizing a GGUF takes tens of seconds: once per file (its path, size and time), into
    a cache folder shared by every command and chapter."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    cached = dem.cache_dir() / "bases" / key.hexdigest()[:24]
    if not (cached / "dem_base.json").is_file():
        _convert(str(gguf.parent), gguf.name, cached, record, trust_remote_code)
    return cached


def _link_dir(src: Path, out: Path) -> Path:
    """Give ``out`` the files of ``src`` (hard links where possible), atomically."""
    with atomic_output_dir(out, overwrite=True) as tmp:
        for f in src.iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:  # another file system, or no hard links: copy
                shutil.copy2(f, tmp / f.name)
    return out


def _convert(source: str, gguf_file, out: Path, record: dict, trust_remote_code: bool) -> Path:
    import json

    model, tokenizer = load_model(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    if (
        getattr(model.config, "quantization_config", None) is not None
        or gguf_file
        or str(source).endswith(".gguf")
    ):
        # A model loaded from GGUF remembers its quantization; rebuild it from the plain config
        # so the saved folder is ordinary fp32 safetensors (identical logits, fast reloads).
        from transformers import AutoModelForCausalLM

        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    return save_model(model, tokenizer, out, extra_files={"dem_base.json": json.dumps(record)})
