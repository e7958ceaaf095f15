"""Sequential pruning: equals the parallel stage where it must, improves on it where errors compound, resumes."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune import ScoreContext, apply_plan_, compensate_, make_plan, score_neurons
from fbnprune.prune.sequential import (
    CheckpointLayers,
    InMemoryLayers,
    SequentialOptions,
    layer_errors,
    prune_sequential,
)
from tests.conftest import tiny_config, tiny_model
from tests.prune.conftest import calib_batch, make_store


def model_with_layers(model_type: str, n_layers: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    cfg.num_hidden_layers = n_layers
    if hasattr(cfg, "layer_types") and cfg.layer_types is not None:
        cfg.layer_types = cfg.layer_types[:n_layers] + [cfg.layer_types[-1]] * max(0, n_layers - len(cfg.layer_types))
    base = tiny_model(model_type, seed=seed)  # the fixture's weight scaling, then cut to n_layers
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {k: v for k, v in base.state_dict().items() if k in model.state_dict()
          and model.state_dict()[k].shape == v.shape}
    model.load_state_dict(sd, strict=False)
    with torch.no_grad():  # layers beyond the base model's copy the scaling of its MLPs
        for name, p in model.named_parameters():
            if "mlp" in name and p.dim() == 2 and name not in sd:
                p.mul_(8.0)
    return model.eval()


def parallel(model, tmp_path, method, sparsity, compensate, seqs, gram_shrink=0.0):
    adapter = get_adapter(model)
    store = make_store(model, tmp_path / "store", seqs)
    ctx = ScoreContext(model=model, adapter=adapter, store=store, sparsity=sparsity, gram_shrink=gram_shrink,
                       progress=False)
    scores = score_neurons(method, ctx)
    plan = make_plan(scores, sparsity=sparsity, allocation="uniform", protected=[])
    compensate_(model, plan, store, compensate, progress=False, method=method, gram_shrink=gram_shrink)
    apply_plan_(model, plan)
    return plan


def opts(**kw):
    base = dict(method="obs", sparsity=0.5, compensate="refit", refit_target="dense", batch_size=3, drop_first=1,
                progress=False)
    return SequentialOptions(**{**base, **kw})


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize(("method", "compensate", "target", "shrink"),
                         [("obs", "refit", "dense", 0.0), ("obs", "refit", "layer", 0.0),
                          ("wanda_sp", "bias", "dense", 0.0), ("obs", "refit", "layer", 0.5)])
def test_one_layer_sequential_equals_parallel(tmp_path, model_type, method, compensate, target, shrink):
    """With one layer there is nothing upstream to correct: both targets and every method give the parallel model
    (the Gram shrunk towards its diagonal as well)."""
    batch = calib_batch()
    m_par = model_with_layers(model_type, 1)
    m_seq = copy.deepcopy(m_par)
    plan = parallel(m_par, tmp_path, method, 0.5, compensate, batch, gram_shrink=shrink)
    res = prune_sequential(InMemoryLayers(m_seq, get_adapter(m_seq)), batch.sequences,
                           opts(method=method, compensate=compensate, refit_target=target, gram_shrink=shrink),
                           tmp_path / "work")
    assert [k.tolist() for k in res.plan.keep] == [k.tolist() for k in plan.keep]
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(m_seq(x).logits, m_par(x).logits, rtol=1e-4, atol=1e-4)
    assert m_seq.config.intermediate_size == m_par.config.intermediate_size == 64
    assert not (tmp_path / "work").exists()  # the work directory goes once the run is complete


def test_sequential_dense_target_beats_parallel_on_a_deep_model(tmp_path):
    """Four layers at 50 %: calibrating on the pruned inputs and aiming at the dense output shrinks the error
    that reaches the last layer (calibration tokens), against the parallel re-fit on dense activations."""
    batch = calib_batch(n_seq=12, seq_len=32)
    dense = model_with_layers("llama", 4)
    m_par, m_seq = copy.deepcopy(dense), copy.deepcopy(dense)
    parallel(m_par, tmp_path, "obs", 0.5, "refit", batch)
    res = prune_sequential(InMemoryLayers(m_seq, get_adapter(m_seq)), batch.sequences, opts(), tmp_path / "w")
    e_par = layer_errors(dense, m_par, batch.sequences, drop_first=1)
    e_seq = layer_errors(dense, m_seq, batch.sequences, drop_first=1)
    # the loop's own record is the diagnostic's number
    assert res.report()["hidden_error"] == pytest.approx(e_seq["hidden_error"], rel=1e-3)
    assert res.report()["mlp_error"] == pytest.approx(e_seq["mlp_error"], rel=1e-3)
    assert e_seq["hidden_error"][-1] < 0.9 * e_par["hidden_error"][-1]
    assert e_seq["hidden_error"][0] == pytest.approx(e_par["hidden_error"][0], rel=1e-3)  # layer 0: same inputs


def test_resume_after_a_crash_gives_the_same_model(tmp_path):
    batch = calib_batch()
    ref = model_with_layers("llama", 3)
    crashed = copy.deepcopy(ref)
    res_ref = prune_sequential(InMemoryLayers(ref, get_adapter(ref)), batch.sequences, opts(), tmp_path / "a")

    def crash(i: int) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prune_sequential(InMemoryLayers(crashed, get_adapter(crashed)), batch.sequences, opts(), tmp_path / "b",
                         after_layer=crash)
    assert (tmp_path / "b" / "layer_001.json").is_file() and not (tmp_path / "b" / "layer_002.json").exists()
    # a fresh process: the dense model loaded again, the work directory found
    fresh = model_with_layers("llama", 3)
    res = prune_sequential(InMemoryLayers(fresh, get_adapter(fresh)), batch.sequences, opts(), tmp_path / "b")
    assert [k.tolist() for k in res.plan.keep] == [k.tolist() for k in res_ref.plan.keep]
    assert res.layers == res_ref.layers
    for (n, a), (_, b) in zip(fresh.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert fresh.config.mlp_bias and fresh.config.intermediate_size == 64


def test_layer_by_layer_loading_equals_in_memory(tmp_path):
    """The bounded-memory path (a meta model, each layer read from the checkpoint and written out pruned) gives
    the same pruned weights as the in-memory loop, and a checkpoint that stock transformers loads."""
    from transformers import AutoModelForCausalLM

    batch = calib_batch()
    src = model_with_layers("llama", 3)
    src.save_pretrained(tmp_path / "src")
    mem = copy.deepcopy(src)
    prune_sequential(InMemoryLayers(mem, get_adapter(mem)), batch.sequences, opts(), tmp_path / "w1")
    layers = CheckpointLayers(tmp_path / "src", tmp_path / "out")
    res = prune_sequential(layers, batch.sequences, opts(), tmp_path / "w2")
    assert all(p.device.type == "meta" for p in get_adapter(layers.model).layers(layers.model)[0].parameters())
    layers.write_checkpoint(res.plan, {"mlp_bias": True})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for (n, a), (_, b) in zip(loaded.state_dict().items(), mem.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(x).logits, mem(x).logits)
    one = load_file(str(tmp_path / "out" / "model-layer-00001.safetensors"))
    assert one["model.layers.1.mlp.down_proj.weight"].shape == (64, 64)


def test_sequential_refuses_what_it_cannot_do(tmp_path):
    m = model_with_layers("llama", 2)
    with pytest.raises(UserError, match="gradients"):
        prune_sequential(InMemoryLayers(m, get_adapter(m)), calib_batch().sequences, opts(method="taylor"),
                         tmp_path / "w")
    with pytest.raises(UserError, match="refit_target"):
        prune_sequential(InMemoryLayers(m, get_adapter(m)), calib_batch().sequences, opts(refit_target="x"),
                         tmp_path / "w")
