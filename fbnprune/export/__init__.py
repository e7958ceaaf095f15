"""Export stage: slim checkpoints that load anywhere, with a model card, provenance and verified compression.

* :func:`export_hf` — safetensors + config (stock layout or per-layer ``per_layer_config`` layout) + card.
* :func:`load_pretrained` — loads either layout (stock ones through transformers).
* :func:`export_gguf` (``fbnprune.export.gguf``) — llama.cpp/Ollama file for uniform Llama models.
* ``fbnprune.export.compare`` — dense vs slim parameters, bytes, peak RAM and tokens/s in fresh processes.
"""

from __future__ import annotations

from fbnprune.export.hf import (
    atomic_dir,
    describe_export,
    export_hf,
    load_pretrained,
    push_to_hub,
    read_manifest,
)

__all__ = ["atomic_dir", "describe_export", "export_hf", "load_pretrained", "push_to_hub", "read_manifest"]
