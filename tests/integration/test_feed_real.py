"""The feeding rule on the two real tokenizers: Gemma 3 starts every sequence with <bos>, SmolLM2 with nothing,
and SmolLM2's calibration and evaluation tokens are exactly those the rule's absence produced (so leaderboard
cells measured before the rule carry over: ``benchmarks/leaderboard/run.py --carry-from v2``)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from fbnprune.collect import make_sequences
from fbnprune.evaluate.ppl import perplexity, token_stream
from fbnprune.models import load_model
from fbnprune.models.feed import start_tokens
from fbnprune.paths import data_dir

pytestmark = pytest.mark.integration

# SHA-256 of the leaderboard's calibration batch (wikitext2-valid, 8,192 tokens in 512-token windows, seed 0) and
# of its evaluation stream (first 8,192 WikiText-2 test tokens), computed for SmolLM2 by the code that produced
# leaderboard protocol v2 (before the rule existed).
SMOLLM2_V2_CALIB_SHA = "d2fe65a9a95d61334dedb9847e7341f081c9ecda46c6c04cb9e3ee3efbb6cfed"
SMOLLM2_V2_STREAM_SHA = "9c8be6c41601db5cbd4893b4f6b0f0f4ccf094d7527a4f02d4c5684fa135dc30"


def _need_data() -> None:
    if data_dir() is None:
        pytest.skip("data directory (../shared/data) not available")


def test_smollm2_token_sequences_are_unchanged_by_the_rule():
    _need_data()
    tok = load_model("smollm2-135m").tokenizer
    assert start_tokens(tok) == []
    calib = make_sequences(tok, "wikitext2-valid", n_tokens=8192, seq_len=512, mode="pack", seed=0)
    assert calib.start == [] and calib.sha256 == SMOLLM2_V2_CALIB_SHA
    stream = token_stream(tok, "wikitext2-test", 8192)
    assert stream.start == () and hashlib.sha256(stream.ids.numpy().tobytes()).hexdigest() == SMOLLM2_V2_STREAM_SHA


def test_gemma3_is_fed_its_bos_and_measures_like_a_healthy_model():
    """Gemma 3 fed without <bos> scored ppl@128 = 864 on the leaderboard's text; with it, a dense model whose
    short-window perplexity is a plausible multiple of its long-window one."""
    _need_data()
    lm = load_model("gemma3-270m")
    tok = lm.tokenizer
    bos = tok.bos_token_id
    assert start_tokens(tok) == [bos] == tok("Hello world").input_ids[:1]
    calib = make_sequences(tok, "wikitext2-valid", n_tokens=1024, seq_len=256, mode="pack", seed=0)
    assert all(int(s[0]) == bos and len(s) == 256 and int((s == bos).sum()) == 1 for s in calib.sequences)
    stream = token_stream(tok, "wikitext2-test", 2048)
    assert stream.start == (bos,) and bos not in stream.ids.tolist()
    with_bos = perplexity(lm.model, stream, seq_len=128, batch_size=4, progress=False)
    without = perplexity(lm.model, stream.ids, start=(), seq_len=128, batch_size=4, progress=False)
    assert with_bos["bos"] and with_bos["tokens_scored"] == without["tokens_scored"] == 16 * 127
    assert with_bos["ppl"] < 200 and without["ppl"] > 3 * with_bos["ppl"]
    # the task harness encodes requests the same way
    from fbnprune.evaluate.harness import make_lm

    lmw = make_lm(lm.model, tok, batch_size=2, progress=False)
    ctx, _ = lmw._encode_pair("Question: what is the capital of France?\nAnswer:", " Paris")
    assert ctx[0] == bos and ctx.count(bos) == 1
    assert torch.equal(torch.tensor(tok("Paris")["input_ids"][:1]), torch.tensor([bos]))
