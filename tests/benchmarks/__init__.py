"""Tests of the benchmark scripts, which are not a package: each is loaded from its file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(path: Path, name: str) -> ModuleType:
    """Import a benchmark script by path (``benchmarks/`` has no ``__init__``; its scripts run as files)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
