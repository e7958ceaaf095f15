"""Forward hooks that stream each layer's down-projection input into an :class:`ActivationStore`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fbnprune import distributed as dist
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


def batch_rows(batch: TokenBatch, batch_size: int, drop_first: int) -> list[int]:
    """Rows each batch of ``batch_size`` sequences adds to the store (every rank can compute them, so rank 0
    knows where every batch's rows go without being told)."""
    lens = [max(len(s) - drop_first, 0) for s in batch.sequences]
    return [sum(lens[b : b + batch_size]) for b in range(0, len(lens), batch_size)]


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

    In a multi-process run (:mod:`fbnprune.distributed`) batch ``b`` runs on rank ``b % world``: the statistics
    are summed over ranks, the rows travel to rank 0 layer by layer (inside the forward pass, so no rank holds
    more than one layer of one batch) and rank 0 alone writes the store, row for row the single-process one.
    The other ranks return the store once rank 0 has finished it.
    """
    adapter = get_adapter(model)
    mlps = adapter.mlps(model)
    widths = [adapter.width(m) for m in mlps]
    device = next(model.parameters()).device
    pad_id = 0
    counts = batch_rows(batch, batch_size, drop_first)
    offsets = [sum(counts[:b]) for b in range(len(counts))]
    n_rows = sum(counts)
    world, me, main = dist.world(), dist.rank(), dist.is_main()
    # rows travel only when they are kept; statistics alone are reduced once at the end
    send_rows = keep_activations and world > 1
    info = dict(meta or {}, source=batch.source, mode=batch.mode, data_sha256=batch.sha256, drop_first=drop_first)
    writer = StoreWriter(Path(path), widths, n_rows, keep_activations, info, files=main)
    state: dict[str, Any] = {"step": 0, "keep": None}

    def make_hook(layer: int):
        def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            rows = args[0][state["keep"]]  # (n, width)
            writer.add_stats(layer, rows)
            step = state["step"]
            batches = [step * world + r for r in range(world)]  # batch of each rank at this step
            if not send_rows:
                writer.write_rows(layer, offsets[batches[me]], rows)
                return
            got = dist.gather_rows(rows, [counts[b] if b < len(counts) else 0 for b in batches],
                                   what=f"activations of layer {layer}")
            for b, part in zip(batches, got or [], strict=False):
                if b < len(counts):
                    writer.write_rows(layer, offsets[b], part)

        return hook

    if main:  # bookkeeping of which sequence/position each row is
        for b, a in enumerate(range(0, len(batch.sequences), batch_size)):
            idx = list(range(a, min(a + batch_size, len(batch.sequences))))
            _, mask = pad_batch([batch.sequences[i] for i in idx], pad_id)
            bi, pos = kept_rows(mask, drop_first).nonzero(as_tuple=True)
            o, n_new = offsets[b], counts[b]
            writer.rows[o : o + n_new, 0] = torch.tensor(idx)[bi].numpy()
            writer.rows[o : o + n_new, 1] = pos.numpy()
            writer.rows[o : o + n_new, 2] = torch.tensor([batch.doc_ids[i] for i in idx])[bi].numpy()
    handles = [adapter.down_module(m).register_forward_pre_hook(make_hook(i)) for i, m in enumerate(mlps)]
    steps = -(-len(counts) // world)
    try:
        for step in tqdm(range(steps), desc="collect activations", unit="batch",
                         disable=not dist.progress_enabled(progress)):
            b = step * world + me
            if b >= len(counts) and not send_rows:
                continue
            state["step"] = step
            if b < len(counts):
                ids, mask = pad_batch(batch.sequences[b * batch_size : (b + 1) * batch_size], pad_id)
                state["keep"] = kept_rows(mask, drop_first).to(device)
            else:  # no batch left for this rank: one token, no rows, so the others' rows still reach rank 0
                ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long)
                state["keep"] = torch.zeros(1, 1, dtype=torch.bool, device=device)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        writer.reduce()
        store = writer.finish() if main else None
    except BaseException:
        writer.abort()
        raise
    finally:
        for h in handles:
            h.remove()
    dist.barrier("activation store")  # rank 0 has renamed the finished store into place
    return store if store is not None else ActivationStore(path)


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
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
    key = store_key(model_info, batch, keep_activations, drop_first)
    path = root / key
    # rank 0 decides, so no rank reuses a store another rank does not see (or sees half-renamed)
    if dist.broadcast_object(reuse and (path / "meta.json").is_file(), what="activation cache lookup"):
        return ActivationStore(path)
    meta = {"model": model_info, "n_sequences": len(batch.sequences), "n_tokens": batch.n_tokens}
    return capture_activations(
        model, batch, path, batch_size=batch_size, keep_activations=keep_activations, drop_first=drop_first, meta=meta
    )
