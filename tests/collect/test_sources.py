"""Text sources: files, data directory names, packing, documents, data-free sampling, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from fbnprune.collect.sources import load_texts, make_sequences
from fbnprune.errors import UserError
from fbnprune.paths import data_dir
from tests.conftest import tiny_model


class CharTok:
    """A deterministic character-level tokenizer (no files needed)."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 2

    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [3 + (ord(c) % 250) for c in text]
        if truncation and max_length:
            ids = ids[:max_length]
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}


def test_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\n  \nsecond doc\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["first doc", "second doc"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    assert load_texts(str(tmp_path / "b.jsonl")) == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: not valid JSON"):
        load_texts(str(tmp_path / "bad.jsonl"))


def test_unknown_and_missing_sources(tmp_path):
    with pytest.raises(UserError, match="unknown text source 'nope'"):
        load_texts("nope")
    with pytest.raises(UserError, match="text file not found"):
        load_texts(str(tmp_path / "missing.txt"))


def test_pack_mode_is_seeded_and_exact(tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(f"line number {i} with some words" for i in range(200)))
    a = make_sequences(CharTok(), str(tmp_path / "t.txt"), n_tokens=300, seq_len=64, seed=3)
    b = make_sequences(CharTok(), str(tmp_path / "t.txt"), n_tokens=300, seq_len=64, seed=3)
    c = make_sequences(CharTok(), str(tmp_path / "t.txt"), n_tokens=300, seq_len=64, seed=4)
    assert len(a.sequences) == 5 and all(len(s) == 64 for s in a.sequences)
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256
    with pytest.raises(UserError, match="fewer than"):
        make_sequences(CharTok(), str(tmp_path / "t.txt"), n_tokens=10**7, seq_len=64)


def test_document_mode_keeps_doc_ids(tmp_path):
    (tmp_path / "t.txt").write_text("short\n" + "a much longer document line here\n" + "another long enough document\n")
    b = make_sequences(CharTok(), str(tmp_path / "t.txt"), n_tokens=40, seq_len=20, mode="document", min_doc_tokens=10)
    assert b.doc_ids == [1, 2]
    assert all(len(s) <= 20 for s in b.sequences)


def test_self_source_samples_from_model():
    model = tiny_model("llama")
    a = make_sequences(CharTok(), "self", n_tokens=40, seq_len=20, seed=0, model=model)
    b = make_sequences(CharTok(), "self", n_tokens=40, seq_len=20, seed=0, model=model)
    assert [len(s) for s in a.sequences] == [20, 20]
    assert a.sha256 == b.sha256
    assert a.sequences[0][0] == CharTok.bos_token_id


@pytest.mark.parametrize("batch, precision", [(2, "float32"), (8, "bfloat16")])
def test_self_source_sampling_batch_and_precision(batch, precision):
    """Any sampling batch fills the asked tokens (a last, smaller batch included); sampling stays seeded at either
    batch and precision, and another batch draws other text."""
    model = tiny_model("llama")
    kw = dict(n_tokens=100, seq_len=20, seed=0, model=model)
    a = make_sequences(CharTok(), "self", sample_batch=batch, sample_precision=precision, **kw)
    b = make_sequences(CharTok(), "self", sample_batch=batch, sample_precision=precision, **kw)
    ref = make_sequences(CharTok(), "self", **kw)  # 8 at a time, float32
    assert [len(s) for s in a.sequences] == [20] * 5
    assert all(s[0] == CharTok.bos_token_id for s in a.sequences)
    assert a.sha256 == b.sha256
    assert (a.sha256 != ref.sha256) == (batch != 8)
    assert all(int(s.max()) < model.config.vocab_size for s in a.sequences)


def test_data_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FBNPRUNE_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(UserError, match="data file for 'wikitext2-valid' is missing"):
        load_texts("wikitext2-valid")
    monkeypatch.setenv("FBNPRUNE_DATA", str(tmp_path / "nowhere"))
    assert data_dir() is None
    with pytest.raises(UserError, match="needs the data directory"):
        load_texts("wikitext2-valid")
