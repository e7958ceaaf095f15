"""Data-free retention: how closely the pruned model's next-token distribution follows the dense one.

Needs no labels, so it works on machines with no benchmark data (the text can be sampled from the dense model).
Reported: mean KL(dense || pruned) per token (nats) and top-1 agreement (fraction of positions where both
models' most likely next token is the same). Several processes (:mod:`fbnprune.distributed`) share the batches
and add the per-batch sums in batch order, as one process does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fbnprune import distributed as dist


@torch.no_grad()
def next_token_agreement(
    dense: Any,
    pruned: Any,
    sequences: list[torch.Tensor],
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean KL(dense || pruned) and top-1 agreement over all positions of ``sequences`` (equal lengths)."""
    device = next(pruned.parameters()).device
    starts = list(range(0, len(sequences), batch_size))
    mine: dict[int, tuple[float, int, int]] = {}
    for i in tqdm(dist.shard(len(starts)), desc="KL vs dense", unit="batch",
                  disable=not dist.progress_enabled(progress)):
        x = torch.stack(sequences[starts[i] : starts[i] + batch_size]).to(device)
        lp = F.log_softmax(dense(input_ids=x, use_cache=False).logits.float(), -1)
        lq = F.log_softmax(pruned(input_ids=x, use_cache=False).logits.float(), -1)
        mine[i] = (float((lp.exp() * (lp - lq)).sum()), int((lp.argmax(-1) == lq.argmax(-1)).sum()),
                   lp.shape[0] * lp.shape[1])
    kl_sum, agree, n = dist.ordered_sum(mine, len(starts), what="retention")  # batch order: the 1-process sums
    return {"kl": kl_sum / n, "top1_agreement": int(agree) / n, "positions": int(n)}
