"""Model sources: built-in offline models, GGUF files, local directories and Hub ids.

``load_model("smollm2-135m")`` returns a :class:`LoadedModel` (model, tokenizer, provenance). GGUF files are
dequantised by transformers once and cached as safetensors under :func:`fbnprune.paths.cache_dir`, keyed by the
file's SHA-256, because the conversion is the slow part (15-50 s) and the cached copy loads in well under a second.
"""

from __future__ import annotations

from fbnprune.models.builtins import BUILTINS, BuiltinModel
from fbnprune.models.load import LoadedModel, load_model, resolve_source

__all__ = ["BUILTINS", "BuiltinModel", "LoadedModel", "load_model", "resolve_source"]
