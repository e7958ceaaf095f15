"""Real activations (SmolLM2-135M, a few layers, ~30 short texts): the torch and scikit-learn backends agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fbnprune.discover import CanICA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    import os

    from fbnprune.collect import collect, make_sequences
    from fbnprune.models import load_model
    from fbnprune.paths import data_dir

    if data_dir() is None:
        pytest.skip("needs the shared data directory (wikitext2-valid)")
    old = os.environ.get("FBNPRUNE_CACHE")
    os.environ["FBNPRUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        lm = load_model("smollm2-135m")
        batch = make_sequences(lm.tokenizer, "wikitext2-valid", n_tokens=1200, seq_len=128, mode="document")
        store = collect(lm.model, batch, model_info=lm.info, keep_activations=True)
        return {i: np.array(store.layer(i)) for i in (2, 20)}
    finally:
        if old is None:
            os.environ.pop("FBNPRUNE_CACHE")
        else:
            os.environ["FBNPRUNE_CACHE"] = old


def _matched_abs_corr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    c = ((a.double() @ b.double().T) / a.shape[1]).abs().numpy()
    r, k = linear_sum_assignment(c, maximize=True)
    return c[r, k]


@pytest.mark.parametrize("layer", [2, 20])
def test_torch_and_sklearn_agree_on_real_activations(acts, layer):
    x = acts[layer]
    kw = dict(n_components=16, n_restarts=2, fun="cube", max_iter=300)
    ref = CanICA(backend="sklearn", **kw).fit(x)
    exact = CanICA(solver="fastica", dtype="float64", **kw).fit(x)
    assert exact.n_iter_ == ref.n_iter_
    assert _matched_abs_corr(exact.components_, ref.components_).min() > 0.999
    fast = CanICA(**kw).fit(x)  # default: Picard-O in float32, same objective and starting points
    corr = _matched_abs_corr(fast.components_, ref.components_)
    assert np.median(corr) > 0.95 and corr.min() > 0.5
    n = int(0.8 * x.shape[1])
    top_a = set(fast.scores_.argsort(descending=True)[:n].tolist())
    top_b = set(ref.scores_.argsort(descending=True)[:n].tolist())
    assert len(top_a & top_b) / len(top_a | top_b) >= 0.85
