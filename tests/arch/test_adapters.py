"""Adapter equivalences on tiny models of every registered architecture."""

from __future__ import annotations

import copy

import pytest
import torch

from fbnprune.arch import ADAPTERS, get_adapter
from fbnprune.errors import UserError
from tests.conftest import ALL_TYPES, tiny_model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def random_keep(width: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(width, generator=g)[:n].sort().values


def test_every_tested_type_is_registered():
    assert sorted(ALL_TYPES) == sorted(ADAPTERS.names())


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(UserError, match="unsupported architecture 'bert'.*llama"):
        get_adapter("bert")


def test_keep_all_leaves_logits_unchanged(any_tiny_model, tokens):
    model = any_tiny_model
    ad = get_adapter(model)
    ref = logits(model, tokens)
    for mlp in ad.mlps(model):
        ad.slice_(mlp, torch.arange(ad.width(mlp)))
    torch.testing.assert_close(logits(model, tokens), ref, rtol=0, atol=0)


def test_slice_equals_mask_with_smaller_shapes(any_tiny_model, tokens):
    model = any_tiny_model
    ad = get_adapter(model)
    masked = copy.deepcopy(model)
    keeps = [random_keep(ad.width(m), 72, i) for i, m in enumerate(ad.mlps(model))]
    before = logits(model, tokens)
    for mlp, k in zip(ad.mlps(masked), keeps, strict=True):
        ad.mask_(mlp, k)
    for mlp, k in zip(ad.mlps(model), keeps, strict=True):
        ad.slice_(mlp, k)
    assert all(ad.width(m) == 72 for m in ad.mlps(model))
    assert all(ad.width(m) == 128 for m in ad.mlps(masked))
    out_s, out_m = logits(model, tokens), logits(masked, tokens)
    torch.testing.assert_close(out_s, out_m, rtol=1e-5, atol=1e-5)
    assert (out_s - before).abs().max() > 1e-3  # pruning really changed the model


def test_mask_equals_zeroing_activation_with_hook(any_tiny_model, tokens):
    """Masking a neuron's weights == zeroing its activation h_j at the down projection's input."""
    model = any_tiny_model
    ad = get_adapter(model)
    hooked = copy.deepcopy(model)
    keeps = [random_keep(ad.width(m), 40, 10 + i) for i, m in enumerate(ad.mlps(model))]
    handles = []
    for mlp, k in zip(ad.mlps(hooked), keeps, strict=True):
        keep_mask = torch.zeros(ad.width(mlp))
        keep_mask[k] = 1.0

        def pre(_m, args, keep_mask=keep_mask):
            return (args[0] * keep_mask,)

        handles.append(ad.down_module(mlp).register_forward_pre_hook(pre))
    for mlp, k in zip(ad.mlps(model), keeps, strict=True):
        ad.mask_(mlp, k)
    out_h = logits(hooked, tokens)
    for h in handles:
        h.remove()
    torch.testing.assert_close(logits(model, tokens), out_h, rtol=1e-5, atol=1e-5)


def test_slice_preserves_dtype_and_device():
    model = tiny_model("llama").to(torch.bfloat16)
    ad = get_adapter(model)
    mlp = ad.mlps(model)[0]
    ad.slice_(mlp, torch.tensor([3, 1, 7]))
    assert ad.width(mlp) == 3
    for p in mlp.parameters():
        assert p.dtype == torch.bfloat16


def test_weight_views_have_linear_orientation(any_tiny_model):
    ad = get_adapter(any_tiny_model)
    mlp = ad.mlps(any_tiny_model)[0]
    d = 64
    assert ad.down_weight(mlp).shape == (d, 128)
    for w in ad.in_weights(mlp):
        assert w.shape == (128, d)
    assert ad.config_width(any_tiny_model.config) == 128


def test_add_down_bias_shifts_output_by_bias(tokens):
    model = tiny_model("llama")
    ad = get_adapter(model)
    mlp = ad.mlps(model)[0]
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = mlp(x)
        delta = torch.randn(64)
        ad.add_down_bias_(mlp, delta)
        torch.testing.assert_close(mlp(x), before + delta, rtol=1e-5, atol=1e-5)
    # Llama's mlp_bias switch also gives gate/up a bias, so the checkpoint matches the stock config.
    assert mlp.gate_proj.bias is not None and float(mlp.gate_proj.bias.abs().sum()) == 0.0


def test_bias_export_capability():
    assert get_adapter("llama").can_export_bias()
    assert get_adapter("gpt2").can_export_bias()
    assert not get_adapter("gemma3_text").can_export_bias()
    with pytest.raises(UserError, match="no config switch"):
        get_adapter("gemma3_text").enable_config_bias(object())
