"""Activation capture: rows equal a direct computation; padding and first positions dropped; atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.collect import ActivationStore, TokenBatch, capture_activations, collect
from fbnprune.collect.capture import kept_rows, pad_batch
from tests.conftest import tiny_model


def direct_h(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """act(gate(x)) * up(x) for one unpadded sequence, computed by hand from the MLP's input."""
    ad = get_adapter(model)
    mlp = ad.mlps(model)[layer]
    seen = {}
    handle = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids[None])
        handle.remove()
        x = seen["x"][0]
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (12, 7, 12, 3, 9)]
    return TokenBatch.build(seqs, "test", "document")


def test_capture_matches_direct_computation(tmp_path, batch):
    model = tiny_model("llama")
    store = capture_activations(model, batch, tmp_path / "s", batch_size=2, progress=False)
    assert store.n_rows == sum(len(s) - 1 for s in batch.sequences)
    rows = store.rows()
    for layer in range(2):
        acts = store.layer(layer)
        for i, seq in enumerate(batch.sequences):
            ref = direct_h(model, seq, layer)[1:]  # first position dropped
            got = torch.from_numpy(np.array(acts[rows[:, 0] == i]))
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        # statistics are over exactly the stored rows
        st = store.stats(layer)
        all_rows = torch.from_numpy(np.array(acts)).double()
        torch.testing.assert_close(st.sum, all_rows.sum(0))
        torch.testing.assert_close(st.l2, all_rows.norm(dim=0))
        torch.testing.assert_close(st.var, all_rows.var(0))
    assert (rows[:, 1] >= 1).all()


def test_padding_and_first_position_masks():
    ids, mask = pad_batch([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert kept_rows(mask, 1).tolist() == [[False, True, True], [False, False, False]]


def test_stats_only_store_refuses_layer_access(tmp_path, batch):
    store = capture_activations(tiny_model("llama"), batch, tmp_path / "s", keep_activations=False, progress=False)
    assert store.stats(0).count == store.n_rows
    with pytest.raises(RuntimeError, match="statistics only"):
        store.layer(0)


def test_interrupted_capture_leaves_nothing(tmp_path, batch):
    model = tiny_model("llama")
    ad = get_adapter(model)
    calls = {"n": 0}

    def boom(_m, _a):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt

    ad.mlps(model)[1].register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        capture_activations(model, batch, tmp_path / "s", batch_size=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_collect_reuses_identical_capture(tmp_path, batch):
    model = tiny_model("llama")
    info = {"source": "tiny", "sha256": "abc", "dtype": "float32"}
    s1 = collect(model, batch, model_info=info, root=tmp_path)
    mtime = (s1.path / "meta.json").stat().st_mtime_ns
    s2 = collect(model, batch, model_info=info, root=tmp_path)
    assert s2.path == s1.path and (s2.path / "meta.json").stat().st_mtime_ns == mtime
    other = TokenBatch.build([(s + 1) % 256 for s in batch.sequences], "test", "document")
    s3 = collect(model, other, model_info=info, root=tmp_path)
    assert s3.path != s1.path
    assert isinstance(ActivationStore(s3.path), ActivationStore)
