"""Perplexity protocol, data-free retention, model stats and the retention report."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fbnprune.errors import UserError
from fbnprune.evaluate import next_token_agreement, perplexity
from fbnprune.evaluate.report import retention_report, to_markdown
from fbnprune.evaluate.speed import model_stats
from tests.evaluate.helpers import md_tables, number


@pytest.fixture(scope="module")
def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_matches_direct_computation(small_llama):
    tokens = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(3))
    r = perplexity(small_llama, tokens, seq_len=64, batch_size=3, progress=False, start=())
    nll, n = 0.0, 0
    for w in range(1000 // 64):  # each non-overlapping window scored on its own; the partial tail is dropped
        x = tokens[w * 64 : (w + 1) * 64]
        with torch.no_grad():
            lp = F.log_softmax(small_llama(input_ids=x[None]).logits[0].double(), -1)
        for i in range(63):
            nll -= float(lp[i, x[i + 1]])
            n += 1
    assert r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert (r["windows"], r["tokens_scored"], r["seq_len"], r["stride"], r["dtype"]) == (15, n, 64, 64, "float32")
    with pytest.raises(UserError, match="at least 64 tokens"):
        perplexity(small_llama, tokens[:50], seq_len=64, progress=False, start=())


@pytest.mark.parametrize("softcap", [None, 0.05])  # small: random logits are far inside a usual cap
def test_chunked_head_equals_the_models_own_logits(monkeypatch, softcap):
    """perplexity() applies the output head in chunks; on Gemma 3 (with and without final soft-capping) the
    result equals the loss from the model's own logits."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    import fbnprune.evaluate.ppl as ppl

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, vocab_size=300, final_logit_softcapping=softcap)
    model = Gemma3ForCausalLM(cfg).eval()
    tokens = torch.randint(0, 300, (640,), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(ppl, "HEAD_CHUNK", 50)  # several chunks per batch, one ragged
    got = perplexity(model, tokens, seq_len=64, batch_size=4, progress=False, start=())
    whole = ppl._full_nll(model)
    windows = tokens.view(10, 64)
    ref = sum(whole(windows[i : i + 4]) for i in range(0, 10, 4))  # the same batches: 4, 4 and 2 windows
    assert got["nll"] == pytest.approx(ref / got["tokens_scored"], rel=1e-5)
    assert ppl._chunked_nll(model) is not None


def test_agreement_of_a_model_with_itself_and_with_a_perturbed_copy(small_llama):
    import copy

    seqs = [torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    same = next_token_agreement(small_llama, small_llama, seqs, batch_size=2, progress=False)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["positions"] == 5 * 32
    other = copy.deepcopy(small_llama)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(-3.0)
    diff = next_token_agreement(small_llama, other, seqs, batch_size=2, progress=False)
    assert diff["kl"] > 1e-4 and diff["top1_agreement"] < 1.0


def test_model_stats_counts_tied_weights_once(small_llama):
    class Tok:  # minimal tokenizer: fixed prompt of 5 tokens
        pad_token_id, eos_token_id = 0, 1

        def __call__(self, text, return_tensors=None):
            from transformers import BatchEncoding

            return BatchEncoding({"input_ids": torch.tensor([[2, 3, 4, 5, 6]]),
                                  "attention_mask": torch.ones(1, 5, dtype=torch.long)})

    s = model_stats(small_llama, Tok(), new_tokens=6, repeats=2)
    total = sum(p.numel() for p in small_llama.parameters())  # parameters() already de-duplicates tied tensors
    assert small_llama.lm_head.weight is small_llama.model.embed_tokens.weight
    assert s["params"] == total and s["param_bytes"] == 4 * total
    g = s["generation"]
    assert g["new_tokens"] == 6 and g["prompt_tokens"] == 5 and g["tokens_per_s"] > 0


def _res(acc: dict[str, float], norm: dict[str, float] | None = None, n: int = 100) -> dict:
    tasks = {}
    for t, a in acc.items():
        e = {"acc": a, "acc_stderr": math.sqrt(a * (1 - a) / (n - 1)), "items": n}
        if norm and t in norm:
            e.update(acc_norm=norm[t], acc_norm_stderr=0.01)
        tasks[t] = e
    return {"tasks": tasks, "settings": {"lm_eval": "x", "engine": "packed", "dtype": "float32",
                                         "blimp_per_paradigm": 100, "limit_note": None}}


def test_retention_report_numbers_and_markdown():
    dense = _res({"piqa": 0.6, "arc_challenge": 0.3, "boolq": 0.5}, {"arc_challenge": 0.4})
    pruned = _res({"piqa": 0.54, "arc_challenge": 0.3, "boolq": 0.55, "copa": 0.5}, {"arc_challenge": 0.3})
    ds = {"params": 100, "param_bytes": 400, "generation": {"tokens_per_s": 10.0, "decoding": "greedy", "batch": 1,
                                                             "prompt_tokens": 5, "new_tokens": 6, "repeats": 2,
                                                             "threads": 2}}
    ps = {"params": 80, "param_bytes": 320, "generation": {"tokens_per_s": 12.0}}
    ppl = {"wikitext2-test@128": {"ppl": 20.0, "seq_len": 128, "stride": 128, "windows": 3, "tokens_scored": 381,
                                  "bos": False, "dtype": "float32", "source": "wikitext2-test"}}
    rep = retention_report(dense, pruned, ds, ps, dense_ppl=ppl,
                           pruned_ppl={"wikitext2-test@128": {**ppl["wikitext2-test@128"], "ppl": 25.0}},
                           agreement={"kl": 0.1, "top1_agreement": 0.8, "positions": 10, "source": "c4"})
    rows = {r["task"]: r for r in rep["tasks"]}
    assert rows["piqa"]["retention"] == pytest.approx(0.9)
    assert rows["arc_challenge"]["metric"] == "acc_norm" and rows["arc_challenge"]["retention"] == pytest.approx(0.75)
    assert rows["boolq"]["retention"] == pytest.approx(1.1)
    assert rep["summary"]["mean_retention"] == pytest.approx((0.9 + 0.75 + 1.1) / 3)
    assert rep["missing_tasks"] == ["copa"]
    assert rep["perplexity"][0]["ratio"] == pytest.approx(1.25)
    assert rep["models"]["params_ratio"] == pytest.approx(0.8) and rep["models"]["speedup"] == pytest.approx(1.2)
    se = rows["piqa"]["retention_stderr"]
    assert se == pytest.approx(0.9 * math.sqrt((rows["piqa"]["pruned_stderr"] / 0.54) ** 2
                                               + (rows["piqa"]["dense_stderr"] / 0.6) ** 2))
    tasks, ppl_table, agreement, models = md_tables(to_markdown(rep))
    piqa = tasks["piqa"]
    assert piqa[:2] == ["acc", "100"] and number(piqa[2]) == 0.6 and number(piqa[3]) == 0.54
    assert number(piqa[4]) == pytest.approx(0.9, abs=5e-4)
    assert number(tasks["**mean (3 tasks)**"][-1]) == pytest.approx((0.9 + 0.75 + 1.1) / 3, abs=5e-4)
    assert [number(c) for c in ppl_table["wikitext2-test@128"][5:]] == [20.0, 25.0, 1.25]
    assert ppl_table["wikitext2-test@128"][:5] == ["128", "3", "381", "no", "float32"]
    assert number(agreement["top-1 agreement"][0]) == 0.8
    assert [number(c) for c in models["pruned / dense"]] == [0.8, 0.8, 1.2, None]  # no CPU time measured


def test_context_ratio_guard_flags_a_model_fed_off_its_training_distribution():
    """Gemma 3 fed without <bos> measured 863.8 at 128 tokens against 61.8 at 2,048 (ratio 14); SmolLM2 measures
    2.8. The guard must flag the first and pass the second, and say nothing with one window length."""
    from fbnprune.evaluate.ppl import PLAUSIBLE_CONTEXT_RATIO, context_ratio_warning

    warning = context_ratio_warning({128: 863.8, 2048: 61.8})
    assert warning is not None and "ppl@128 / ppl@2048 = 14.0" in warning
    assert context_ratio_warning({2048: 19.56, 128: 54.8}) is None
    assert context_ratio_warning({128: 863.8}) is None
    assert context_ratio_warning({128: PLAUSIBLE_CONTEXT_RATIO * 10.0, 2048: 10.0}) is None
    assert context_ratio_warning({128: PLAUSIBLE_CONTEXT_RATIO * 10.01, 2048: 10.0}) is not None


def _ppl(value: float, seq_len: int, source: str = "wikitext2-test") -> dict:
    return {"ppl": value, "seq_len": seq_len, "stride": seq_len, "windows": 4, "tokens_scored": 4 * (seq_len - 1),
            "bos": False, "dtype": "float32", "source": source}


def test_retention_report_warns_per_source_and_leaves_out_empty_tables():
    dense = {"wikitext2-test@128": _ppl(800.0, 128), "wikitext2-test@2048": _ppl(60.0, 2048),
             "c4@128": _ppl(40.0, 128), "c4@2048": _ppl(20.0, 2048)}
    pruned = {k: {**v, "ppl": v["ppl"] * 1.2} for k, v in dense.items()}
    rep = retention_report({"tasks": {}}, {"tasks": {}}, dense_ppl=dense, pruned_ppl=pruned)
    assert len(rep["warnings"]) == 1 and rep["warnings"][0].startswith("wikitext2-test: dense ppl@128 / ppl@2048")
    md = to_markdown(rep)
    assert md.startswith("**Warning**: wikitext2-test: dense ppl@128")
    assert "| task |" not in md and "0 tasks" not in md and "| c4@2048 |" in md
    healthy = retention_report({"tasks": {}}, {"tasks": {}}, dense_ppl={"c4@128": _ppl(40.0, 128)},
                               pruned_ppl={"c4@128": _ppl(48.0, 128)})
    assert healthy["warnings"] == [] and "Warning" not in to_markdown(healthy)
