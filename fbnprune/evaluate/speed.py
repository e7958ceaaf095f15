"""Size and speed of a model: parameters (tied weights once), bytes of the parameters, greedy generation tokens/s.

Why a fixed protocol: tokens/s depends on prompt length, number of new tokens, batch size, threads and whether
the first (warm-up) call is counted. Everything is fixed here and recorded next to the number; the median of
``repeats`` timed runs is reported, after one untimed warm-up run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

DEFAULT_PROMPT = "The history of the city begins in the early nineteenth century, when"


def unique_parameters(model: Any) -> list[torch.Tensor]:
    """Parameters with tied/shared tensors counted once (by storage pointer)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


@torch.no_grad()
def generation_speed(model: Any, tokenizer: Any, *, prompt: str = DEFAULT_PROMPT, new_tokens: int = 64,
                     repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Greedy decoding speed (batch 1, KV cache on, exactly ``new_tokens`` new tokens)."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
              use_cache=True)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    try:
        model.generate(**enc, **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up, not timed
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(**enc, **kw)
            times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    produced = int(out.shape[1] - enc["input_ids"].shape[1])
    med = statistics.median(times)
    return {
        "tokens_per_s": round(produced / med, 2),
        "new_tokens": produced,
        "prompt_tokens": int(enc["input_ids"].shape[1]),
        "repeats": repeats,
        "seconds_median": round(med, 3),
        "batch": 1,
        "decoding": "greedy, KV cache",
        "threads": torch.get_num_threads(),
    }


def model_stats(model: Any, tokenizer: Any, *, speed: bool = True, new_tokens: int = 64, repeats: int = 3
                ) -> dict[str, Any]:
    """Parameter count (tied weights once), parameter bytes, dtype, and (optionally) generation tokens/s."""
    params = unique_parameters(model)
    stats: dict[str, Any] = {
        "params": int(sum(p.numel() for p in params)),
        "param_bytes": int(sum(p.numel() * p.element_size() for p in params)),
        "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
        "device": str(params[0].device) if params else None,
    }
    if speed:
        stats["generation"] = generation_speed(model, tokenizer, new_tokens=new_tokens, repeats=repeats)
    return stats
