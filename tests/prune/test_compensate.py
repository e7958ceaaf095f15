"""Bias and re-fit compensation: lower output error on calibration data, slice == mask, export behaviour."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune import apply_plan_, bias_compensation_, make_plan, refit_compensation_
from fbnprune.prune.compensate import check_exportable, compensate_
from fbnprune.prune.gram import augmented_gram, clear_gram_cache
from tests.conftest import tiny_model
from tests.prune.conftest import calib_batch, make_store


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def scores_for(model, seed=0):
    ad = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(ad.width(m), generator=g, dtype=torch.float64) for m in ad.mlps(model)]


def layer_errors(model, store, ref_model) -> list[float]:
    """Per-layer squared error of the down projection's output on the stored (dense) activations."""
    ad = get_adapter(model)
    errs = []
    for i, (m, m0) in enumerate(zip(ad.mlps(model), ad.mlps(ref_model), strict=True)):
        h = torch.from_numpy(np.array(store.layer(i), dtype=np.float32))
        with torch.no_grad():
            want = ad.down_module(m0)(h)
            got = ad.down_module(m)(h)  # pruned neurons have zero columns (mask mode)
        errs.append(float(((got - want) ** 2).sum()))
    return errs


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "gemma3_text"])
def test_compensation_lowers_output_error_on_calibration_data(tmp_path, model_type):
    clear_gram_cache()
    dense = tiny_model(model_type)
    store = make_store(dense, tmp_path / "s")
    plan = make_plan(scores_for(dense), sparsity=0.5)
    errs = {}
    for kind in ("none", "bias", "refit"):
        m = copy.deepcopy(dense)
        compensate_(m, plan, store, kind)
        apply_plan_(m, plan, "mask")
        errs[kind] = layer_errors(m, store, dense)
    for i in range(2):
        assert errs["bias"][i] < errs["none"][i]
        assert errs["refit"][i] < 0.9 * errs["bias"][i]


def test_bias_equals_mean_contribution_of_pruned_neurons(tmp_path):
    dense = tiny_model("llama")
    store = make_store(dense, tmp_path / "s")
    plan = make_plan(scores_for(dense), sparsity=0.25)
    m = copy.deepcopy(dense)
    bias_compensation_(m, plan, store)
    ad = get_adapter(m)
    for i, mlp in enumerate(ad.mlps(m)):
        h = np.asarray(store.layer(i), dtype=np.float64)
        pr = plan.pruned(i).numpy()
        w = ad.down_weight(ad.mlps(dense)[i]).detach().double().numpy()
        want = w[:, pr] @ h[:, pr].mean(0)
        np.testing.assert_allclose(ad.down_bias(mlp).detach().double().numpy(), want, rtol=1e-5, atol=1e-6)
        # gate/up get zero biases so the state dict matches what mlp_bias=True builds
        assert mlp.gate_proj.bias is not None and float(mlp.gate_proj.bias.detach().abs().max()) == 0


def test_compensation_reduces_end_to_end_error_on_llama(tmp_path):
    dense = tiny_model("llama")
    batch = calib_batch(n_seq=8)
    store = make_store(dense, tmp_path / "s", batch)
    x = torch.stack(batch.sequences)
    ref = logits(dense, x)
    plan = make_plan(scores_for(dense), sparsity=0.5)
    err = {}
    for kind in ("none", "bias", "refit"):
        m = copy.deepcopy(dense)
        compensate_(m, plan, store, kind)
        apply_plan_(m, plan, "slice")
        err[kind] = float(((logits(m, x) - ref) ** 2).mean())
    assert err["refit"] < err["bias"] < err["none"]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2", "phi3", "gemma3_text"])
@pytest.mark.parametrize("kind", ["bias", "refit"])
def test_slice_equals_mask_after_compensation(tmp_path, tokens, model_type, kind):
    dense = tiny_model(model_type)
    store = make_store(dense, tmp_path / "s")
    plan = make_plan(scores_for(dense), sparsity=0.5, allocation="global")
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    compensate_(a, plan, store, kind)
    compensate_(b, plan, store, kind)
    apply_plan_(a, plan, "slice")
    apply_plan_(b, plan, "mask")
    torch.testing.assert_close(logits(a, tokens), logits(b, tokens), rtol=1e-5, atol=1e-5)


def test_keep_all_with_compensation_changes_nothing(tmp_path, tokens):
    dense = tiny_model("llama")
    store = make_store(dense, tmp_path / "s")
    plan = make_plan(scores_for(dense), sparsity=0.0)
    for kind in ("bias", "refit"):
        m = copy.deepcopy(dense)
        compensate_(m, plan, store, kind)
        apply_plan_(m, plan, "slice")
        torch.testing.assert_close(logits(m, tokens), logits(dense, tokens), rtol=0, atol=0)


def test_llama_bias_is_stock_loadable(tmp_path, tokens):
    from transformers import AutoModelForCausalLM

    dense = tiny_model("llama")
    store = make_store(dense, tmp_path / "s")
    plan = make_plan(scores_for(dense), sparsity=0.5)
    bias_compensation_(dense, plan, store)
    apply_plan_(dense, plan, "slice")
    assert dense.config.mlp_bias is True
    check_exportable(dense)  # no error
    dense.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.intermediate_size == 64
    torch.testing.assert_close(logits(back, tokens), logits(dense, tokens), rtol=1e-5, atol=1e-5)


def test_gemma3_bias_is_kept_in_memory_but_export_refuses(tmp_path, tokens, caplog):
    dense = tiny_model("gemma3_text")
    store = make_store(dense, tmp_path / "s")
    plan = make_plan(scores_for(dense), sparsity=0.5)
    m = copy.deepcopy(dense)
    with caplog.at_level("WARNING"):
        bias_compensation_(m, plan, store)
    assert "cannot" in caplog.text
    assert get_adapter(m).down_bias(get_adapter(m).mlps(m)[0]) is not None
    with pytest.raises(UserError, match="gemma3_text.*silently drop"):
        check_exportable(m)
    check_exportable(dense)  # an uncompensated model is fine


def test_refit_report_and_gram(tmp_path):
    clear_gram_cache()
    dense = tiny_model("llama")
    store = make_store(dense, tmp_path / "s")
    g = augmented_gram(store, 0)
    h = np.asarray(store.layer(0), dtype=np.float64)
    ha = np.concatenate([h, np.ones((len(h), 1))], 1)
    np.testing.assert_allclose(g.numpy(), ha.T @ ha, rtol=1e-5, atol=1e-4)
    plan = make_plan(scores_for(dense), sparsity=0.5)
    rep = refit_compensation_(copy.deepcopy(dense), plan, store, ridge=1e-4, progress=False)
    for i in range(2):
        assert 0 <= rep["layers"][i]["refit"] < rep["layers"][i]["pruned"] <= 1.5


def test_gram_shrink_scales_covariances_only_and_stays_psd(tmp_path):
    from fbnprune.prune.gram import moments, shrink_to_diagonal

    g_ = torch.Generator().manual_seed(0)
    h = torch.randn(6, 9, generator=g_, dtype=torch.float64) + 2.0  # 6 rows, 9 neurons: a singular covariance
    x = torch.cat([h, torch.ones(6, 1, dtype=torch.float64)], 1)
    g = x.T @ x
    rows, mean, cov = moments(g)
    for lam in (0.3, 1.0):
        out = shrink_to_diagonal(g, lam)
        r2, m2, c2 = moments(out)
        assert r2 == rows and torch.allclose(m2, mean) and torch.allclose(c2.diagonal(), cov.diagonal())
        off = ~torch.eye(9, dtype=torch.bool)
        assert torch.allclose(c2[off], (1 - lam) * cov[off])
        assert torch.linalg.eigvalsh(c2).min() > -1e-12
    assert shrink_to_diagonal(g, 0.0) is g
    with pytest.raises(UserError, match="gram_shrink"):
        shrink_to_diagonal(g, 1.5)


def test_refit_with_gram_shrink_differs_and_reports_measured_errors(tmp_path):
    """The shrunk re-fit is another solution; its errors are measured on the calibration activations as they are,
    so it fits them less closely than the plain re-fit (which is optimal on them up to its tiny ridge)."""
    clear_gram_cache()
    dense = tiny_model("llama")
    store = make_store(dense, tmp_path / "s")
    plan = make_plan(scores_for(dense), sparsity=0.5)
    plain, shrunk = copy.deepcopy(dense), copy.deepcopy(dense)
    rep0 = refit_compensation_(plain, plan, store, ridge=1e-4, progress=False)
    rep1 = compensate_(shrunk, plan, store, "refit", ridge=1e-4, gram_shrink=0.5, progress=False)
    assert rep1["gram_shrink"] == 0.5 and "gram_shrink" not in rep0
    ad = get_adapter(dense)
    for i, (a, b) in enumerate(zip(ad.mlps(plain), ad.mlps(shrunk), strict=True)):
        assert not torch.allclose(ad.down_weight(a), ad.down_weight(b), atol=1e-5)
        assert rep0["layers"][i]["refit"] < rep1["layers"][i]["refit"] <= rep1["layers"][i]["pruned"]


def test_compensation_errors(tmp_path):
    dense = tiny_model("llama")
    store = make_store(dense, tmp_path / "s")
    plan = make_plan(scores_for(dense), sparsity=0.5)
    with pytest.raises(UserError, match="collect"):
        bias_compensation_(dense, plan, None)
    with pytest.raises(UserError, match="unknown compensation"):
        compensate_(dense, plan, store, "lora")
    with pytest.raises(UserError, match="ridge"):
        refit_compensation_(dense, plan, store, ridge=-1)
    apply_plan_(dense, plan, "slice")
    with pytest.raises(UserError, match="before apply_plan_"):
        bias_compensation_(dense, plan, store)
    stats_only = tiny_model("llama")
    from fbnprune.collect import capture_activations

    s2 = capture_activations(stats_only, calib_batch(), tmp_path / "s2", keep_activations=False, progress=False)
    with pytest.raises(UserError, match="keep_activations"):
        refit_compensation_(stats_only, make_plan(scores_for(stats_only), sparsity=0.5), s2)
