"""Forward hooks that stream each layer's down-projection input into an :class:`ActivationStore`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fbnprune.arch import get_adapter
from fbnprune.collect.sources import TokenBatch
from fbnprune.collect.store import ActivationStore, StoreWriter
from fbnprune.paths import cache_dir


def pad_batch(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` into ``(input_ids, attention_mask)``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def kept_rows(mask: torch.Tensor, drop_first: int = 1) -> torch.Tensor:
    """Boolean ``(B, T)``: real (non-padding) tokens, minus the first ``drop_first`` positions of each sequence."""
    keep = mask.bool().clone()
    keep[:, :drop_first] = False
    return keep


@torch.no_grad()
def capture_activations(
    model: Any,
    batch: TokenBatch,
    path: str | Path,
    *,
    batch_size: int = 4,
    keep_activations: bool = True,
    drop_first: int = 1,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> ActivationStore:
    """Run ``model`` over ``batch`` and write every layer's down-projection input to a store at ``path``.

    The store is built in a hidden temporary directory and renamed at the end, so an interrupted capture
    leaves nothing that looks finished.
    """
    adapter = get_adapter(model)
    mlps = adapter.mlps(model)
    widths = [adapter.width(m) for m in mlps]
    device = next(model.parameters()).device
    pad_id = 0
    n_rows = sum(max(len(s) - drop_first, 0) for s in batch.sequences)
    info = dict(meta or {}, source=batch.source, mode=batch.mode, data_sha256=batch.sha256, drop_first=drop_first)
    writer = StoreWriter(Path(path), widths, n_rows, keep_activations, info)
    state = {"offset": 0, "keep": None}

    def make_hook(layer: int):
        def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            h = args[0]
            rows = h[state["keep"]]  # (n, width)
            writer.add(layer, state["offset"], rows)

        return hook

    handles = [adapter.down_module(m).register_forward_pre_hook(make_hook(i)) for i, m in enumerate(mlps)]
    try:
        order = list(range(len(batch.sequences)))
        for b in tqdm(range(0, len(order), batch_size), desc="collect activations", unit="batch", disable=not progress):
            idx = order[b : b + batch_size]
            seqs = [batch.sequences[i] for i in idx]
            ids, mask = pad_batch(seqs, pad_id)
            keep = kept_rows(mask, drop_first)
            state["keep"] = keep.to(device)
            n_new = int(keep.sum())
            # bookkeeping of which sequence/position each row is
            bi, pos = keep.nonzero(as_tuple=True)
            o = state["offset"]
            writer.rows[o : o + n_new, 0] = torch.tensor(idx)[bi].numpy()
            writer.rows[o : o + n_new, 1] = pos.numpy()
            writer.rows[o : o + n_new, 2] = torch.tensor([batch.doc_ids[i] for i in idx])[bi].numpy()
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            state["offset"] += n_new
        store = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        for h in handles:
            h.remove()
    return store


def store_key(model_info: dict[str, Any], batch: TokenBatch, keep_activations: bool, drop_first: int) -> str:
    """Cache key of a store: same model weights + same tokens + same options -> same store."""
    blob = json.dumps(
        {
            "model": model_info.get("sha256") or model_info.get("source"),
            "dtype": model_info.get("dtype"),
            "data": batch.sha256,
            "keep": keep_activations,
            "drop_first": drop_first,
            "v": 1,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def collect(
    model: Any,
    batch: TokenBatch,
    *,
    model_info: dict[str, Any],
    batch_size: int = 4,
    keep_activations: bool = True,
    drop_first: int = 1,
    root: Path | None = None,
    reuse: bool = True,
) -> ActivationStore:
    """Capture activations into the cache, reusing an earlier identical capture.

    Reuse is only safe for unmodified models: ``model_info`` identifies the weights (the GGUF hash for built-ins).
    """
    root = Path(root) if root is not None else cache_dir() / "activations"
    root.mkdir(parents=True, exist_ok=True)
    key = store_key(model_info, batch, keep_activations, drop_first)
    path = root / key
    if reuse and (path / "meta.json").is_file():
        return ActivationStore(path)
    meta = {"model": model_info, "n_sequences": len(batch.sequences), "n_tokens": batch.n_tokens}
    return capture_activations(
        model, batch, path, batch_size=batch_size, keep_activations=keep_activations, drop_first=drop_first, meta=meta
    )
