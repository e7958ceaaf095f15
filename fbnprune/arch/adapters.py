"""Built-in adapters. Most decoder-only families share the Llama layout; only real differences get an entry."""

from __future__ import annotations

from fbnprune.arch.base import ADAPTERS, MLPAdapter

# Llama's config has `mlp_bias`, so a down-projection bias (from compensation) stays stock-loadable.
ADAPTERS.add("llama", MLPAdapter(name="llama", layers_path="model.layers", bias_key="mlp_bias"))

# Same layout, no switch for an MLP bias in their configs.
for _mt in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"):
    ADAPTERS.add(_mt, MLPAdapter(name=_mt, layers_path="model.layers"))

# Phi-3 fuses gate and up into one projection of 2*I rows: [gate | up].
ADAPTERS.add(
    "phi3",
    MLPAdapter(name="phi3", layers_path="model.layers", style="fused_gated", in_projs=("gate_up_proj",)),
)

# GPT-2: Conv1D (weights stored (in, out)), biases on both projections, width in `n_inner`.
ADAPTERS.add(
    "gpt2",
    MLPAdapter(
        name="gpt2",
        layers_path="transformer.h",
        style="conv1d",
        in_projs=("c_fc",),
        down="c_proj",
        width_key="n_inner",
        bias_key="always",
    ),
)
