"""The lm-eval wrapper: packed scoring equals a direct forward, accuracy equals a direct computation, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fbnprune.errors import UserError
from fbnprune.evaluate.harness import PackedScorer, evaluate_tasks
from tests.conftest import word_tokenizer


def _direct_ll(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    x = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()[0]
    lp = F.log_softmax(logits[len(ctx) - 1 : -1], -1)
    tgt = torch.tensor(cont)
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def _pairs(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(7):
        ctx = torch.randint(1, 200, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):  # several choices share one context
            n = int(torch.randint(1, 12, (1,), generator=g))
            pairs.append((ctx, torch.randint(1, 200, (n,), generator=g).tolist()))
    return pairs


@pytest.mark.parametrize("row_tokens", [16, 512])
def test_packed_scorer_matches_direct_forward_llama(tiny_llama, row_tokens):
    pairs = _pairs()
    got = PackedScorer(tiny_llama, max_length=4096, row_tokens=row_tokens, rows_per_batch=3).score(pairs, progress=False)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        want, want_greedy = _direct_ll(tiny_llama, ctx, cont)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy


def test_packed_scorer_gemma3_sliding_window_and_softcap():
    """Sliding-window layers get their own mask (window on position ids); final logit soft-capping is applied."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0,
                           max_position_embeddings=512)
    model = Gemma3ForCausalLM(cfg).eval()
    pairs = _pairs(1)
    assert max(len(c) for c, _ in pairs) > 8
    got = PackedScorer(model, max_length=512, row_tokens=64, rows_per_batch=2).score(pairs, progress=False)
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(_direct_ll(model, ctx, cont)[0], abs=1e-4)


def _hflm_encode(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing context spaces move to the continuation; the pair is encoded whole."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@pytest.mark.integration
def test_accuracy_matches_direct_computation(smol_vocab_llama, tokenizer, data_root):
    """acc / acc_norm / stderr of the harness equal a direct computation on the same items (known answers)."""
    from fbnprune.evaluate.tasks import read_docs

    n = 10
    res = evaluate_tasks(smol_vocab_llama, tokenizer, ["piqa", "arc_easy"], limit=n, batch_size=4, progress=False)
    for task in ("piqa", "arc_easy"):
        docs = read_docs(task, data_root)[:n]
        correct, correct_norm = [], []
        for d in docs:
            if task == "piqa":
                ctx, choices, gold = f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]
            else:
                ctx, choices = f"Question: {d['question']}\nAnswer:", d["choices"]["text"]
                gold = d["choices"]["label"].index(d["answerKey"])
            lls = [_direct_ll(smol_vocab_llama, *_hflm_encode(tokenizer, ctx, " " + c))[0] for c in choices]
            correct.append(max(range(len(lls)), key=lambda i: lls[i]) == gold)
            norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
            correct_norm.append(max(range(len(norm)), key=lambda i: norm[i]) == gold)
        r = res["tasks"][task]
        acc = sum(correct) / n
        assert r["acc"] == pytest.approx(acc)
        assert r["acc_norm"] == pytest.approx(sum(correct_norm) / n)
        assert r["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
        assert r["items"] == n and r["source"] == "offline"
    st = res["settings"]
    assert st["limit"] == n and "smoke test" in st["limit_note"] and st["engine"] == "packed"


@pytest.mark.integration
def test_packed_engine_equals_lm_eval_loop(smol_vocab_llama, tokenizer, data_root):
    kw = dict(limit=12, batch_size=4, progress=False)
    a = evaluate_tasks(smol_vocab_llama, tokenizer, ["winogrande", "copa"], engine="packed", **kw)
    b = evaluate_tasks(smol_vocab_llama, tokenizer, ["winogrande", "copa"], engine="hflm", **kw)
    for t in ("winogrande", "copa"):
        assert a["tasks"][t]["acc"] == b["tasks"][t]["acc"]


@pytest.mark.integration
def test_blimp_group_reports_subset(smol_vocab_llama, tokenizer, data_root):
    r = evaluate_tasks(smol_vocab_llama, tokenizer, ["blimp"], limit=2, batch_size=8, blimp_per_paradigm=5,
                       progress=False)["tasks"]["blimp"]
    assert r["paradigms"] == 67 and r["items"] == 134 and r["subset"]["per_paradigm"] == 5
    accs = [s["acc"] for s in r["subtasks"].values()]
    assert r["acc"] == pytest.approx(sum(accs) / len(accs))  # lm-eval's group mean, not weighted by size


@pytest.mark.integration  # lm-eval indexes its whole task registry to suggest a name: 12-20 s
def test_unknown_task_name_is_a_clear_error(tiny_llama):
    with pytest.raises(UserError, match=r"unknown task 'piqaa'.*did you mean.*piqa"):
        evaluate_tasks(tiny_llama, word_tokenizer(), ["piqaa"], limit=1, batch_size=1)


def test_bad_arguments(tiny_llama):
    tokenizer = word_tokenizer()
    with pytest.raises(UserError, match="limit"):
        evaluate_tasks(tiny_llama, tokenizer, ["copa"], limit=0, batch_size=1)
    with pytest.raises(UserError, match="engine"):
        evaluate_tasks(tiny_llama, tokenizer, ["copa"], limit=1, batch_size=1, engine="fast")
    with pytest.raises(UserError, match="at least one task"):
        evaluate_tasks(tiny_llama, tokenizer, [], limit=1, batch_size=1)


def test_packed_scorer_splits_a_context_shared_by_many_requests(tiny_llama):
    """blimp: every request has the same (empty) context; the group must be cut into rows, not one huge row."""
    g = torch.Generator().manual_seed(5)
    pairs = [([1], torch.randint(2, 200, (int(n),), generator=g).tolist())
             for n in torch.randint(1, 15, (40,), generator=g)]
    scorer = PackedScorer(tiny_llama, max_length=4096, row_tokens=32, rows_per_batch=4)
    seen_T: list[int] = []
    orig = scorer.decoder.forward

    def spy(*a, **kw):
        seen_T.append(kw["input_ids"].shape[1])
        return orig(*a, **kw)

    scorer.decoder.forward = spy
    try:
        got = scorer.score(pairs, progress=False)
    finally:
        del scorer.decoder.forward
    assert max(seen_T) <= 32 and len(seen_T) > 1
    for (ctx, cont), (ll, _) in zip(pairs, got, strict=True):
        assert ll == pytest.approx(_direct_ll(tiny_llama, ctx, cont)[0], abs=1e-4)
