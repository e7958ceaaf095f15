"""Resolve a model source string and load it as a float32 (or bf16) causal LM with its tokenizer."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbnprune.errors import UserError
from fbnprune.paths import cache_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """A forward pass's precision context: bfloat16 matrix products on float32 weights, or none ("float32").

    Training and sampling use it to run about twice as fast on CPUs with bfloat16 units (AMX) while keeping the
    weights, and everything computed outside the products, in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


@dataclass
class LoadedModel:
    """A model, its tokenizer and where they came from (recorded in provenance)."""

    model: Any
    tokenizer: Any
    source: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "builtin" | "gguf" | "dir" | "hub"
    name: str
    path: Path | None = None


def resolve_source(source: str) -> ResolvedSource:
    """Classify ``source`` without loading anything heavy. Raises :class:`UserError` for bad input."""
    from fbnprune.models.builtins import BUILTINS

    if not isinstance(source, str) or not source.strip():
        raise UserError("model source must be a non-empty string")
    if source in BUILTINS:
        return ResolvedSource("builtin", source)
    p = Path(source).expanduser()
    if source.lower().endswith(".gguf"):
        if not p.is_file():
            raise UserError(f"GGUF file not found: {source}")
        return ResolvedSource("gguf", p.name, p.resolve())
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{source} is a directory but holds no config.json (not a Hugging Face model directory)")
        return ResolvedSource("dir", str(p.resolve()), p.resolve())
    looks_local = source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1]
    if "/" in source and not looks_local and source.count("/") == 1:
        return ResolvedSource("hub", source)
    if "/" in source or source.startswith((".", "~")):
        raise UserError(f"model path not found: {source}")
    close = difflib.get_close_matches(source, list(BUILTINS), n=2, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UserError(
        f"unknown built-in model {source!r}; built-ins: {', '.join(sorted(BUILTINS))} "
        f"(or give a local directory, a .gguf file or a Hub id 'org/name').{hint}"
    )


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _converted_gguf_dir(gguf: Path) -> tuple[Path, str]:
    """Convert ``gguf`` to a safetensors directory once; later calls reuse it (keyed by the file's hash)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _sha256(gguf)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "fbnprune_source.json").is_file():
        return target, digest
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantised model is plain float32; drop the GGUF quantiser so it can be saved as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = gguf.stem
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "fbnprune_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": digest}, indent=2)
        )
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target, digest


def load_model(source: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load ``source`` (built-in name, ``.gguf`` path, local directory or Hub id) for pruning.

    Example:
        >>> lm = load_model("smollm2-135m")  # doctest: +SKIP
        >>> lm.model.config.intermediate_size  # doctest: +SKIP
        1536
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fbnprune.models.builtins import BUILTINS

    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    res = resolve_source(source)
    info: dict[str, Any] = {"source": source, "kind": res.kind, "dtype": dtype}
    if res.kind == "builtin":
        b = BUILTINS[res.name]
        gguf = b.locate()
        path, digest = _converted_gguf_dir(gguf)
        info.update(gguf=str(gguf), sha256=digest, base_model=b.base_model, license=b.license)
    elif res.kind == "gguf":
        assert res.path is not None
        path, digest = _converted_gguf_dir(res.path)
        info.update(gguf=str(res.path), sha256=digest)
    elif res.kind == "dir":
        assert res.path is not None
        path = res.path
    else:
        path = Path(res.name)  # hub id: transformers resolves it (fails cleanly when offline)
        info["base_model"] = res.name
    from transformers import AutoConfig

    from fbnprune.arch import get_adapter

    try:
        config = AutoConfig.from_pretrained(str(path))
        get_adapter(config)  # fail before loading weights, with the list of supported architectures
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_DTYPES[dtype])
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {source!r}: {str(e).strip().splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    info["model_type"] = model.config.model_type
    return LoadedModel(model=model, tokenizer=tok, source=source, info=info)
