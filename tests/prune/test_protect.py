"""Data-derived protected layers: the layer whose MLP matters most is found and protected."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fbnprune.arch import get_adapter
from fbnprune.prune import make_plan
from fbnprune.prune.protect import auto_protected_layers, layer_sensitivity
from tests.prune.conftest import calib_batch


def four_layer_llama(hot_layer: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for i, mlp in enumerate(get_adapter(model).mlps(model)):
            for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                p.weight.normal_(0, 0.3 if i == hot_layer else 0.05)
    return model


def test_sensitivity_finds_the_planted_layer_and_protects_it():
    model = four_layer_llama(hot_layer=2)
    seqs = calib_batch(n_seq=4, seq_len=16).sequences
    sens = layer_sensitivity(model, seqs, progress=False)
    assert len(sens["delta"]) == 4
    assert max(range(4), key=lambda i: sens["delta"][i]) == 2
    chosen, info = auto_protected_layers(model, seqs, factor=2.0, max_layers=1, progress=False)
    assert chosen == [2] and info["protected"] == [2]
    g = torch.Generator().manual_seed(0)
    plan = make_plan([torch.rand(64, generator=g) for _ in range(4)], sparsity=0.25, protected=chosen)
    assert plan.kept_widths[2] == 64


def test_nothing_protected_when_no_layer_stands_out():
    model = four_layer_llama(hot_layer=-1)
    seqs = calib_batch(n_seq=4, seq_len=16).sequences
    chosen, info = auto_protected_layers(model, seqs, factor=1e6, progress=False)
    assert chosen == [] and info["threshold"] > 0
