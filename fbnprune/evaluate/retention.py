"""Data-free retention: how closely the pruned model's next-token distribution follows the dense one.

Needs no labels, so it works on machines with no benchmark data (the text can be sampled from the dense model).
Reported: mean KL(dense || pruned) per token (nats) and top-1 agreement (fraction of positions where both
models' most likely next token is the same).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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
    kl_sum, agree, n = 0.0, 0, 0
    device = next(pruned.parameters()).device
    for b in tqdm(range(0, len(sequences), batch_size), desc="KL vs dense", unit="batch", disable=not progress):
        x = torch.stack(sequences[b : b + batch_size]).to(device)
        lp = F.log_softmax(dense(input_ids=x, use_cache=False).logits.float(), -1)
        lq = F.log_softmax(pruned(input_ids=x, use_cache=False).logits.float(), -1)
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        n += lp.shape[0] * lp.shape[1]
    return {"kl": kl_sum / n, "top1_agreement": agree / n, "positions": n}
