"""Adapters on the real built-in models: slice == mask, capture == the MLP's own intermediate activation."""

from __future__ import annotations

import copy

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.models import load_model

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("name, model_type, layers, width", [("smollm2-135m", "llama", 30, 1536),
                                                               ("gemma3-270m", "gemma3_text", 18, 2048)])
def test_real_model_slice_equals_mask(name, model_type, layers, width):
    lm = load_model(name)
    model = lm.model
    ad = get_adapter(model)
    assert ad.name == model_type and len(ad.mlps(model)) == layers
    assert all(ad.width(m) == width for m in ad.mlps(model))
    ids = lm.tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    masked = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    keeps = [torch.randperm(width, generator=g)[: width - width // 10].sort().values for _ in range(layers)]
    for mlp, k in zip(ad.mlps(model), keeps, strict=True):
        ad.slice_(mlp, k)
    for mlp, k in zip(ad.mlps(masked), keeps, strict=True):
        ad.mask_(mlp, k)
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = masked(input_ids=ids).logits
    assert all(ad.width(m) == len(keeps[0]) for m in ad.mlps(model))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
