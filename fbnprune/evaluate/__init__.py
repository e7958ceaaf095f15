"""Evaluate stage: perplexity under a pinned protocol, data-free retention (KL, top-1) and lm-eval tasks."""

from __future__ import annotations

from fbnprune.evaluate.ppl import perplexity
from fbnprune.evaluate.retention import next_token_agreement

__all__ = ["next_token_agreement", "perplexity"]
