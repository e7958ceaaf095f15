"""How text enters a model: one rule (the tokenizer's own start of a text) for every place that feeds a model.

Each test uses two real Hugging Face tokenizers that differ only in whether their default adds ``<s>`` (as
Gemma 3's adds ``<bos>`` and SmolLM2's adds nothing), so a path that ignores the rule fails one of them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fbnprune.collect.sources import make_sequences
from fbnprune.errors import UserError
from fbnprune.evaluate.ppl import TokenStream, perplexity, token_stream
from fbnprune.models.feed import adds_bos, feed_info, seed_token, start_tokens
from tests.conftest import WORDS, tiny_model

BOS, EOS = 1, 2


def word_tokenizer(template: str | None):
    """A word-level tokenizer over ``WORDS``; ``template`` is its post-processor (``"<s> $A"`` adds BOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", BOS), ("</s>", EOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


@pytest.fixture(params=["bos", "plain"])
def tok(request):
    return word_tokenizer("<s> $A" if request.param == "bos" else None)


def _text_file(tmp_path, n_lines=80, words=30):
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (words,), generator=g)) for _ in range(n_lines)]
    path = tmp_path / "text.txt"
    path.write_text("\n".join(lines))
    return str(path), lines


def test_start_tokens_follow_the_tokenizers_default():
    assert start_tokens(word_tokenizer("<s> $A")) == [BOS]
    assert start_tokens(word_tokenizer(None)) == []
    # an end-of-text token the default appends is not part of how a text starts
    assert start_tokens(word_tokenizer("<s> $A </s>")) == [BOS]
    assert start_tokens(word_tokenizer("$A </s>")) == []
    assert adds_bos(word_tokenizer("<s> $A")) and not adds_bos(word_tokenizer(None))
    assert feed_info([BOS]) == {"bos": True, "start_tokens": [BOS]}
    # nothing-yet token: the start token where there is one, else BOS (lm-eval's choice for empty contexts)
    assert seed_token(word_tokenizer("<s> $A")) == BOS and seed_token(word_tokenizer(None)) == BOS


def test_pack_calibration_starts_like_a_text_and_keeps_the_window_grid(tok, tmp_path):
    path, lines = _text_file(tmp_path)
    batch = make_sequences(tok, path, n_tokens=256, seq_len=32, seed=5)
    stream = torch.tensor(tok("\n\n".join(lines) + "\n\n", add_special_tokens=False)["input_ids"])
    start = start_tokens(tok)
    assert batch.start == start and all(len(s) == 32 for s in batch.sequences)
    starts = torch.randperm(len(stream) // 32, generator=torch.Generator().manual_seed(5))[:8].sort().values * 32
    for s, a in zip(batch.sequences, starts.tolist(), strict=True):
        # the same window of text as without start tokens, cut to make room for them
        assert s.tolist() == start + stream[a : a + 32 - len(start)].tolist()


def test_document_calibration_starts_like_a_text(tok, tmp_path):
    path, lines = _text_file(tmp_path, n_lines=10, words=12)
    batch = make_sequences(tok, path, n_tokens=40, seq_len=10, mode="document", min_doc_tokens=4)
    for s, d in zip(batch.sequences, batch.doc_ids, strict=True):
        assert s.tolist() == (start_tokens(tok) + tok(lines[d], add_special_tokens=False)["input_ids"])[:10]


def test_self_generated_text_starts_like_a_text(tok):
    model = tiny_model("llama")
    model.config.bos_token_id, model.config.eos_token_id = BOS, EOS
    batch = make_sequences(tok, "self", n_tokens=40, seq_len=20, seed=0, model=model)
    assert [len(s) for s in batch.sequences] == [20, 20]
    first = {int(s[0]) for s in batch.sequences}
    if adds_bos(tok):
        assert first == {BOS}
    else:  # generation was seeded with a token the tokenizer never starts a text with: it is not kept
        assert BOS not in first
    assert batch.start == start_tokens(tok)


def _direct_ppl(model, ids: torch.Tensor, seq_len: int, start: list[int]) -> float:
    nll, n = 0.0, 0
    for w in range(len(ids) // seq_len):
        x = torch.cat([torch.tensor(start, dtype=torch.long), ids[w * seq_len : (w + 1) * seq_len]])
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=x[None]).logits[0].double(), -1)
        k = len(start)
        for i in range(k + 1, len(x)):  # the text's 2nd to last token, each predicted from all before it
            nll -= float(lp[i - 1, x[i]])
            n += 1
    return math.exp(nll / n)


def test_perplexity_windows_start_like_a_text_and_score_the_same_tokens(tok, tmp_path):
    path, _ = _text_file(tmp_path)
    stream = token_stream(tok, path, max_tokens=300)
    assert stream.start == tuple(start_tokens(tok)) and len(stream) == 300
    model = tiny_model("llama")
    r = perplexity(model, stream, seq_len=64, batch_size=3, progress=False)
    assert r["ppl"] == pytest.approx(_direct_ppl(model, stream.ids, 64, list(stream.start)), rel=1e-5)
    # whatever the start tokens, the scored targets are the same: 63 per 64-token window
    assert (r["tokens_scored"], r["windows"], r["bos"]) == (4 * 63, 4, adds_bos(tok))


def test_chunked_head_path_scores_the_same_tokens_as_the_full_path(monkeypatch):
    import fbnprune.evaluate.ppl as ppl

    model = tiny_model("gemma3_text")  # has a separate decoder and head: perplexity takes the chunked path
    ids = torch.randint(3, 200, (256,), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(ppl, "HEAD_CHUNK", 37)
    got = perplexity(model, TokenStream(ids, (BOS,)), seq_len=64, batch_size=2, progress=False)
    assert got["ppl"] == pytest.approx(_direct_ppl(model, ids, 64, [BOS]), rel=1e-5)


def test_a_bare_tensor_must_say_how_it_starts():
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (128,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="start="):
        perplexity(model, ids, seq_len=64, progress=False)
    with pytest.raises(ValueError, match="start given twice"):
        perplexity(model, TokenStream(ids, (BOS,)), start=(), seq_len=64, progress=False)
    a = perplexity(model, ids, start=(BOS,), seq_len=64, progress=False)
    assert a["ppl"] == perplexity(model, TokenStream(ids, (BOS,)), seq_len=64, progress=False)["ppl"]
    with pytest.raises(UserError, match="fewer than 2 text tokens"):
        make_sequences(word_tokenizer("<s> $A"), "self", n_tokens=8, seq_len=2, model=model)


def test_task_requests_start_like_a_text(tok):
    """lm-eval's requests (and so the packed scorer's inputs) follow the same rule, and an empty context is the
    token that text sampled from nothing starts from."""
    from fbnprune.evaluate.harness import make_lm

    model = tiny_model("llama")
    model.config.bos_token_id, model.config.eos_token_id = BOS, EOS
    lm = make_lm(model, tok, batch_size=2, progress=False)
    ctx, cont = lm._encode_pair("the cat of", " the")
    assert ctx[: len(start_tokens(tok))] == start_tokens(tok)
    assert (ctx[0] == BOS) == adds_bos(tok)
    assert lm.prefix_token_id == seed_token(tok)
