"""Hugging Face export: ``model.safetensors`` + ``config.json`` + tokenizer + generation config.

Uniform widths load with stock ``AutoModelForCausalLM.from_pretrained``. Everything is written into a hidden
temporary directory next to the target and renamed at the end, so an interrupted export leaves no half-written
model directory.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fbnprune.errors import UserError


def atomic_dir(target: str | Path, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Run ``write(tmp_dir)`` and rename ``tmp_dir`` to ``target``; on any failure remove ``tmp_dir``."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"output directory exists: {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def export_hf(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    extra_json: dict[str, Any] | None = None,
    extra_text: dict[str, str] | None = None,
    max_shard_size: str = "2GB",
) -> Path:
    """Save ``model`` (already sliced) and ``tokenizer`` to ``out_dir`` atomically, plus extra files."""
    widths = getattr(model.config, "fbnprune_layer_widths", None)
    if widths is not None and len(set(widths)) > 1:
        raise UserError(
            "this model has per-layer MLP widths, which stock transformers cannot load; "
            "use allocation 'uniform' or the non-uniform export"
        )

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str))
        for name, text in (extra_text or {}).items():
            (tmp / name).write_text(text)

    return atomic_dir(out_dir, write)


def load_pretrained(path: str | Path, dtype: Any = None, **kwargs: Any) -> Any:
    """Load an fbnprune export. Uniform exports are plain Hugging Face checkpoints."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
