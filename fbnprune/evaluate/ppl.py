"""Token-level perplexity in non-overlapping windows, with every setting recorded.

Protocol: the text is tokenised as one stream (documents joined by blank lines, no special tokens), cut into
consecutive non-overlapping windows of ``seq_len`` tokens (the last partial window is dropped), optionally
limited to the first ``max_tokens`` tokens; each window is scored independently; the loss is averaged over all
predicted tokens (``seq_len - 1`` per window). This is the WikiText-2 protocol of LLM-Pruner/FLAP (128) and
SliceGPT/Wanda (2048), made explicit.

Each window is fed the way the tokenizer starts a text (:mod:`fbnprune.models.feed`): a tokenizer that adds
``<bos>`` gets it in front of every window. The start tokens are context, never scored: every model scores the
same text tokens (the 2nd to the last of each window), so a model with and one without ``<bos>`` are compared on
the same targets, and a model that adds nothing sees exactly the windows it always saw.

In a multi-process run (:mod:`fbnprune.distributed`) batch ``b`` of windows is scored on rank ``b % world`` and
the per-batch NLL sums are added in batch order on every rank: the result is the one-process number exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.collect.sources import _tokenize_concat, load_texts
from fbnprune.errors import UserError
from fbnprune.models.feed import feed_info, start_tokens


@dataclass(frozen=True)
class TokenStream:
    """Evaluation text as one token stream plus the tokens every window must start with (may be none)."""

    ids: torch.Tensor
    start: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def token_stream(tokenizer: Any, source: str, max_tokens: int | None = None) -> TokenStream:
    """The evaluation text of ``source`` as one token stream, with the tokenizer's start tokens (see module doc)."""
    ids = _tokenize_concat(tokenizer, load_texts(source), limit=max_tokens)[: max_tokens or None]
    return TokenStream(ids, tuple(start_tokens(tokenizer)))


@torch.no_grad()
def perplexity(
    model: Any,
    tokens: TokenStream | torch.Tensor,
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    progress: bool = True,
    desc: str = "perplexity",
    start: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``tokens`` in non-overlapping windows of ``seq_len`` text tokens.

    ``tokens`` is a :class:`TokenStream` (which knows its start tokens) or a bare id tensor with ``start`` given
    (``()`` for none): a bare tensor without it is refused, so no caller forgets how the model is fed.
    Returns the perplexity and the protocol (windows, tokens scored, seq_len, stride, bos, dtype, seconds).
    """
    if isinstance(tokens, TokenStream):
        if start is not None and tuple(start) != tokens.start:
            raise ValueError("start given twice, and differently: the stream already carries its start tokens")
        ids, start = tokens.ids, tokens.start
    elif start is None:
        raise TypeError("perplexity of a bare token tensor needs start=... (the tokenizer's start tokens, or ())")
    else:
        ids = tokens
    head = torch.tensor(list(start), dtype=torch.long)
    n_win = len(ids) // seq_len
    nll_of = _chunked_nll(model, skip=len(head)) or _full_nll(model, skip=len(head))
    if n_win == 0:
        raise UserError(f"perplexity needs at least {seq_len} tokens, got {len(ids)}")
    windows = ids[: n_win * seq_len].view(n_win, seq_len)
    if len(head):
        windows = torch.cat([head.expand(n_win, -1), windows], dim=1)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    starts = list(range(0, n_win, batch_size))
    mine: dict[int, tuple[float]] = {}
    for i in tqdm(dist.shard(len(starts)), desc=desc, unit="batch", disable=not dist.progress_enabled(progress)):
        mine[i] = (nll_of(windows[starts[i] : starts[i] + batch_size].to(device)),)
    # per-batch sums added in batch order whichever rank computed them: the one-process sum, bit for bit
    nll = dist.ordered_sum(mine, len(starts), what="perplexity")[0]
    count = n_win * (seq_len - 1)
    return {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "seq_len": seq_len,
        "stride": seq_len,
        "windows": n_win,
        "tokens_scored": count,
        **feed_info(start),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _targets(x: torch.Tensor, skip: int) -> tuple[slice, torch.Tensor]:
    """The positions whose outputs are scored and their targets: every text token after a window's first, so the
    ``skip`` start tokens and the prediction of the first text token from them are context only."""
    return slice(skip, -1), x[:, skip + 1 :]


def _full_nll(model: Any, skip: int = 0) -> Any:
    """Summed next-token NLL of a batch from the model's own logits (any causal LM)."""

    def nll(x: torch.Tensor) -> float:
        pos, target = _targets(x, skip)
        logits = model(input_ids=x, use_cache=False).logits.float()[:, pos]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))

    return nll


HEAD_CHUNK = 1024  # positions per output-head call in perplexity()


def split_head(model: Any) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor]] | None:
    """The model's decoder and a function from its hidden states to float logits (the output head, then the final
    soft-capping when configured, as the model's own forward applies them), or None when the model has no
    separate decoder and head. Scoring only the positions that need logits is what this split is for."""
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    decoder = get_dec() if callable(get_dec) else None
    head = get_head() if callable(get_head) else None
    if decoder is None or head is None:
        return None
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden).float()
        return torch.tanh(out / cap) * cap if cap else out

    return decoder, logits


def _chunked_nll(model: Any, skip: int = 0) -> Any:
    """The same NLL with the output head applied ``HEAD_CHUNK`` positions at a time, or None when the model has no
    separate decoder and head.

    Why: Gemma 3's vocabulary has 262,144 entries, so one batch's full logits take 4 GiB and the loss copies them
    twice more; in chunks, ppl@128 on 8,192 tokens took 51 s instead of 73 on 2 cores."""
    split = split_head(model)
    if split is None:
        return None
    decoder, to_logits = split

    def nll(x: torch.Tensor) -> float:
        pos, target = _targets(x, skip)
        hidden = decoder(input_ids=x, use_cache=False).last_hidden_state[:, pos]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        target = target.reshape(-1)
        total, chunk = 0.0, HEAD_CHUNK
        for a in range(0, len(target), chunk):
            total += float(F.cross_entropy(to_logits(hidden[a : a + chunk]), target[a : a + chunk], reduction="sum"))
        return total

    return nll


# A healthy causal LM gains from context, but not wildly: dense models measured here lie at ppl@128 / ppl@2048 of
# 2-3 (SmolLM2 2.8; LLaMA-7B about 2.3 in published tables). Gemma 3 fed without its <bos> showed 14.
PLAUSIBLE_CONTEXT_RATIO = 5.0


def context_ratio_warning(ppl_by_len: dict[int, float]) -> str | None:
    """A warning when a model's perplexity at its shortest windows is implausibly far above that at its longest,
    the sign of a model fed in a way it was not trained on (a missing ``<bos>``, a broken position encoding);
    None when fewer than two window lengths were measured or the ratio is plausible."""
    if len(ppl_by_len) < 2:
        return None
    short, long = min(ppl_by_len), max(ppl_by_len)
    ratio = ppl_by_len[short] / ppl_by_len[long]
    if ratio <= PLAUSIBLE_CONTEXT_RATIO:
        return None
    return (f"dense ppl@{short} / ppl@{long} = {ratio:.1f}, above the {PLAUSIBLE_CONTEXT_RATIO:g} a healthy model "
            f"stays under: check how text enters the model (its start tokens, its positions) before comparing")


def context_warnings(ppl_by_source: dict[str, dict[int, float]]) -> list[str]:
    """:func:`context_ratio_warning` for each text source (``{source: {seq_len: ppl}}``), as ``"source: warning"``
    lines, so the run's output and its report say the same thing."""
    found = ((src, context_ratio_warning(v)) for src, v in sorted(ppl_by_source.items()))
    return [f"{src}: {w}" for src, w in found if w]
