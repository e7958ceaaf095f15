"""Before / after rows (gap closed), the budget summary and the loss figure, on fixed numbers."""

from __future__ import annotations

import pytest

from fbnprune.recover import loss_figure
from fbnprune.recover.report import before_after_rows, spent, to_markdown


def test_gap_closed_is_the_share_of_the_gap_to_dense():
    results = {"dense": {"ppl_x_2048": {"ppl": 20.0}},
               "pruned": {"ppl_x_2048": {"ppl": 26.0}, "retention": {"kl": 0.3, "top1_agreement": 0.7}},
               "recovery": {"before": {"ppl_x_2048": {"ppl": 28.0}, "retention": {"kl": 0.5, "top1_agreement": 0.6}}}}
    rows = {r["metric"]: r for r in before_after_rows(results, {"ppl_x_2048": "x@2048"})}
    assert rows["perplexity x@2048"] == {"metric": "perplexity x@2048", "dense": 20.0, "before": 28.0,
                                         "after": 26.0, "gap_closed": 0.25}
    assert rows["KL(dense‖model), nats/token"]["gap_closed"] == pytest.approx(0.4)
    assert rows["top-1 agreement with dense"]["gap_closed"] == pytest.approx(0.25)


def record(steps, terms=("kl",)):
    return {"method": "full", "target_modules": ["mlp"], "trainable_params": 1000,
            "budget": {"max_minutes": 15.0, "max_tokens": None}, "stop": "max_minutes", "steps": steps,
            "tokens": steps * 2048, "minutes": 15.01, "tokens_per_s": 180.2, "passes_over_text": 1.2,
            "loss_start": 0.9, "loss_end": 0.5, "resumed_from_step": None, "loss_terms": list(terms),
            "data": {"sources": [{"source": "c4"}, {"source": "technical"}]},
            "curve": [[i + 1, (i + 1) * 2048, 1.0 / (i + 1), 1e-4, *([0.5 / (i + 1)] * len(terms))]
                      for i in range(steps)]}


def test_budget_line_says_what_was_spent():
    s = spent(record(100))
    assert s["data"] == ["c4", "technical"] and "curve" not in s
    text = to_markdown([], s)
    assert text.startswith("Recovery: full on mlp (1,000 trainable parameters), data c4, technical; spent 100 steps, "
                           "204,800 tokens, 15.01 min (180.2 tokens/s; budget max_minutes 15.0; stopped by max_minutes)")


@pytest.mark.parametrize("steps, terms", [(3, ("kl",)), (120, ("kl", "network"))])
def test_loss_figure(tmp_path, steps, terms):
    path = loss_figure(record(steps, terms), tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
