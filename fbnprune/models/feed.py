"""How text enters a model: every sequence starts the way the model's tokenizer starts a text.

A model is only measured fairly on inputs shaped like its training data. Gemma 3's tokenizer puts ``<bos>`` before
every text and the model depends on it (dense perplexity on WikiText-2 in 128-token windows is about 800 without
it and about 109 with it); SmolLM2's tokenizer adds nothing (its ``bos_token`` is a chat marker). So the rule is
read from the tokenizer's own default, never from ``bos_token_id``: :func:`start_tokens` is what the tokenizer
puts before a text when asked for its special tokens. Every place that cuts text into model inputs (calibration
windows and documents, perplexity windows, held-out retention text, text sampled from the model, the task
harness) starts its sequences with those tokens, and every results file records ``bos``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_PROBE = "The quick brown fox"


def start_tokens(tokenizer: Any) -> list[int]:
    """The ids the tokenizer's default puts before a text (``[<bos>]`` for Gemma 3, ``[]`` for SmolLM2).

    Found by encoding a probe text with and without special tokens: whatever precedes the bare encoding is the
    prefix (a suffix such as an ``<eos>`` some tokenizers append is not part of how a text *starts*)."""
    bare = list(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    if not bare:
        return []
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i]
    # the special tokens changed the text's own tokens (rare): take what the default adds before them, if known
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and full and full[0] == bos and bare[0] != bos else []


def adds_bos(tokenizer: Any) -> bool:
    """Whether this tokenizer starts a text with special tokens (recorded as ``bos`` in every protocol)."""
    return bool(start_tokens(tokenizer))


def seed_token(tokenizer: Any) -> int:
    """The token that stands for "nothing yet" when the model must produce text from nothing, or score a text
    with no context: the last of the tokenizer's start tokens, else its BOS, else its end-of-text token (the same
    choice lm-eval makes for contexts that are empty)."""
    start = start_tokens(tokenizer)
    if start:
        return start[-1]
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has no start, end-of-text or BOS token to start generation from")


def feed_info(start: Sequence[int]) -> dict[str, Any]:
    """The part of a protocol that says how sequences started."""
    return {"bos": bool(start), "start_tokens": [int(t) for t in start]}
