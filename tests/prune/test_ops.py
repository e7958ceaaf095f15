"""apply_plan_ across every adapter: keep-all is a no-op, slice == mask, config/dtype/device, validation."""

from __future__ import annotations

import copy

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune import apply_plan_, make_plan
from fbnprune.prune.plan import KeepPlan, count_params, params_per_neuron
from tests.conftest import tiny_model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def random_scores(model, seed=0):
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(ad.width(m), generator=g, dtype=torch.float64) for m in ad.mlps(model)]


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_keep_all_leaves_logits_unchanged(any_tiny_model, tokens, mode):
    model = any_tiny_model
    ref = logits(model, tokens)
    plan = make_plan(random_scores(model), sparsity=0.0)
    assert plan.n_removed == 0
    apply_plan_(model, plan, mode)
    torch.testing.assert_close(logits(model, tokens), ref, rtol=0, atol=0)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_slice_equals_mask_with_smaller_shapes(any_tiny_model, tokens, allocation):
    model = any_tiny_model
    ad = get_adapter(model)
    before = logits(model, tokens)
    n_before = count_params(model)
    plan = make_plan(random_scores(model), sparsity=0.375, allocation=allocation, round_to=8)
    masked = copy.deepcopy(model)
    apply_plan_(masked, plan, "mask")
    apply_plan_(model, plan, "slice")
    assert [ad.width(m) for m in ad.mlps(masked)] == plan.widths
    assert [ad.width(m) for m in ad.mlps(model)] == plan.kept_widths
    out_s, out_m = logits(model, tokens), logits(masked, tokens)
    torch.testing.assert_close(out_s, out_m, rtol=1e-5, atol=1e-5)
    assert (out_s - before).abs().max() > 1e-3
    assert n_before - count_params(model) == plan.n_removed * params_per_neuron(masked, ad)
    if plan.uniform:
        assert ad.config_width(model.config) == plan.kept_widths[0]
    else:
        assert model.config.fbnprune_layer_widths == plan.kept_widths


def test_non_uniform_plan_records_layer_widths():
    model = tiny_model("llama")
    plan = KeepPlan(widths=[128, 128], keep=[torch.arange(64), torch.arange(96)])
    apply_plan_(model, plan, "slice")
    assert model.config.fbnprune_layer_widths == [64, 96]
    assert model.config.intermediate_size == 128


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_dtype_is_preserved(mode, tokens):
    model = tiny_model("llama").to(torch.bfloat16)
    plan = make_plan(random_scores(model), sparsity=0.5)
    apply_plan_(model, plan, mode)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(model, tokens).float()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_is_preserved(tokens):
    model = tiny_model("llama").cuda()
    apply_plan_(model, make_plan(random_scores(model), sparsity=0.5), "slice")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert torch.isfinite(logits(model, tokens.cuda())).all()


def test_bad_plan_leaves_model_untouched(tokens):
    model = tiny_model("llama")
    ref = logits(model, tokens)
    plan = KeepPlan(widths=[128, 96], keep=[torch.arange(64), torch.arange(48)])  # layer 1 width is wrong
    with pytest.raises(UserError, match="layer 1"):
        apply_plan_(model, plan, "slice")
    torch.testing.assert_close(logits(model, tokens), ref, rtol=0, atol=0)
    with pytest.raises(UserError, match="unknown prune mode"):
        apply_plan_(model, make_plan(random_scores(model), sparsity=0.5), "zero")
    with pytest.raises(UserError, match="plan has 3 layers"):
        apply_plan_(model, KeepPlan(widths=[128] * 3, keep=[torch.arange(8)] * 3), "mask")


def test_pruning_twice_is_refused():
    model = tiny_model("gpt2")
    plan = make_plan(random_scores(model), sparsity=0.5)
    apply_plan_(model, plan, "slice")
    with pytest.raises(UserError, match="already pruned"):
        apply_plan_(model, plan, "slice")
