"""Trainable parameters: LoRA adapters take the pruned shapes, merging keeps the adapter model's outputs (and the
compensation bias), target names resolve per architecture, full fine-tuning freezes everything else."""

from __future__ import annotations

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.recover.trainable import full_, lora_, resolve_targets, trainable_parameters
from tests.recover.helpers import pair


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "phi3", "gpt2"])
def test_lora_adapters_have_the_sliced_shapes(model_type):
    _, student = pair(model_type)
    adapter = get_adapter(student)
    widths = [adapter.width(m) for m in adapter.mlps(student)]
    assert len(set(widths)) == 2 and max(widths) < 128  # sliced, to different widths per layer
    targets = resolve_targets(student, adapter, ["mlp"])
    model = lora_(student, targets, rank=4, alpha=8, dropout=0.0, seed=0)
    d = student.config.hidden_size if model_type != "gpt2" else student.config.n_embd
    fused = 2 if model_type == "phi3" else 1
    for i, mlp in enumerate(adapter.mlps(student)):
        down = adapter.down_module(mlp)
        assert down.lora_A["default"].weight.shape == (4, widths[i])  # input side of down: the kept neurons
        assert down.lora_B["default"].weight.shape == (d, 4)
        for name in adapter.in_projs:
            proj = getattr(mlp, name)
            assert proj.lora_A["default"].weight.shape == (4, d)
            assert proj.lora_B["default"].weight.shape == (fused * widths[i], 4)
    x = torch.randint(0, 256, (2, 12))
    model(input_ids=x).logits.sum().backward()  # the shapes also work in a forward and backward pass


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_merged_model_equals_adapter_model(model_type):
    _, student = pair(model_type)
    adapter = get_adapter(student)
    bias0 = adapter.down_bias(adapter.mlps(student)[0]).detach().clone()
    model = lora_(student, resolve_targets(student, adapter, ["all"]), rank=4, alpha=8, dropout=0.0, seed=0)
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to merge
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=x).logits
        merged = model.merge_and_unload()
        after = merged(input_ids=x).logits
    assert merged is student  # merged in place: the pipeline keeps its model object
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (after - before).abs().max() < 1e-4 and (after - before).abs().max() < 1e-3 * before.abs().max()
    assert torch.equal(adapter.down_bias(adapter.mlps(merged)[0]), bias0)  # the compensation bias survives


def test_targets_resolve_per_architecture():
    _, llama = pair("llama")
    ad = get_adapter(llama)
    names = resolve_targets(llama, ad, ["mlp"])
    assert names == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    attn = resolve_targets(llama, ad, ["attention"])
    assert len(attn) == 8 and all(".self_attn." in n for n in attn)
    assert len(resolve_targets(llama, ad, ["all"])) == 14
    assert resolve_targets(llama, ad, ["q_proj", "down_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(UserError, match=r"\['c_fc'\] match no projection of this llama model; it has \[.*gate_proj"):
        resolve_targets(llama, ad, ["mlp", "c_fc"])
    _, gpt2 = pair("gpt2")
    mlp = resolve_targets(gpt2, get_adapter(gpt2), ["mlp"])
    assert mlp == [f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]  # not attn.c_proj


def test_full_finetuning_trains_only_the_targets():
    _, student = pair("llama")
    targets = resolve_targets(student, get_adapter(student), ["down_proj"])
    full_(student, targets)
    names = set(trainable_parameters(student))
    assert names == {"model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.bias",
                     "model.layers.1.mlp.down_proj.weight"}
