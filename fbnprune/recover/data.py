"""Training text for recovery: windows of ``seq_len`` tokens from one or more sources, prepared before training.

Every source goes through :func:`fbnprune.collect.make_sequences` (pack mode), so windows start the way the
tokenizer starts a text, exactly like calibration and evaluation windows. The text is made at the start of a run,
before anything costly: a missing or too-short source is an error before collection, pruning or training.
``self`` is sampled from the dense model, so recovery needs no data at all; sampled text is kept in the cache
(:func:`sampled_text`), because sampling costs about as much as a short recovery budget and every later run with
the same dense model and sampling settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from fbnprune.collect.sources import DATA_FILES, TokenBatch, _tokenize_concat, load_texts, make_sequences
from fbnprune.errors import UserError
from fbnprune.models.feed import seed_token, start_tokens
from fbnprune.paths import cache_dir, data_dir
from fbnprune.recover.checkpoint import weights_hash
from fbnprune.recover.config import EVALUATION_TEXT, RecoverConfig


@dataclass
class TrainingText:
    """Equal-length token windows (``(n, seq_len)``) plus where they came from (recorded in the report)."""

    ids: torch.Tensor
    sources: list[dict[str, Any]] = field(default_factory=list)
    sha256: str = ""

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def info(self) -> dict[str, Any]:
        return {"sequences": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1]), "tokens": self.n_tokens,
                "sha256": self.sha256, "sources": self.sources}


def _all_windows(tokenizer: Any, source: str, seq_len: int) -> int:
    """Tokens in every whole window of ``source`` (pack mode), so that ``n_tokens: null`` takes all of it."""
    n = len(_tokenize_concat(tokenizer, load_texts(source), limit=None))
    if n < seq_len:
        raise UserError(f"recover.data {source!r} has {n} tokens, fewer than one window of seq_len {seq_len}")
    return (n // seq_len) * seq_len


def training_text(tokenizer: Any, cfg: RecoverConfig, *, model: Any = None,
                  exclude: Iterable[str] = ()) -> TrainingText:
    """The training windows of ``cfg.data`` (``model``: the dense model, for ``self``).

    ``exclude`` names sources that must not be trained on (the run's evaluation text); ``wikitext2-test`` always is.
    Raises :class:`UserError`, before any training, for a forbidden, missing or too-short source, and when all the
    text together does not fill one optimizer step.
    """
    banned = {EVALUATION_TEXT, *exclude}
    for src in cfg.data:
        if src in banned:
            raise UserError(f"recover.data {src!r} is evaluation text in this run; train on other text")
        if src in DATA_FILES and data_dir() is None:
            raise UserError(f"recover.data {src!r} needs the data directory (set FBNPRUNE_DATA), or train on text "
                            "sampled from the model: recover.data=[self] recover.n_tokens=65536")
    seqs: list[torch.Tensor] = []
    infos: list[dict[str, Any]] = []
    for i, src in enumerate(cfg.data):
        asked = cfg.tokens_of(src)
        want = asked if asked is not None else _all_windows(tokenizer, src, cfg.seq_len)
        if src == "self":
            batch = sampled_text(tokenizer, model, n_tokens=want, seq_len=cfg.seq_len, seed=cfg.seed + i,
                                 sample_batch=cfg.sample_batch, precision=cfg.precision)
        else:
            batch = make_sequences(tokenizer, src, n_tokens=want, seq_len=cfg.seq_len, mode="pack", seed=cfg.seed + i)
        seqs.extend(batch.sequences)
        infos.append({"source": batch.source, "sequences": len(batch.sequences), "tokens": batch.n_tokens,
                      "sha256": batch.sha256})
    if len({len(s) for s in seqs}) != 1:
        raise UserError("recover: training windows of unequal length (a source shorter than seq_len?)")
    ids = torch.stack(seqs)
    per_step = cfg.batch_size * cfg.grad_accum
    if ids.shape[0] < per_step:
        raise UserError(f"recover: the training text holds {ids.shape[0]} windows of {cfg.seq_len} tokens, fewer "
                        f"than one optimizer step takes (batch_size {cfg.batch_size} x grad_accum "
                        f"{cfg.grad_accum}); give more text or smaller batches")
    h = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    return TrainingText(ids=ids, sources=infos, sha256=h)


def sampled_text(tokenizer: Any, model: Any, *, n_tokens: int, seq_len: int, seed: int, sample_batch: int,
                 precision: str) -> TokenBatch:
    """``self`` text sampled from ``model``, or the same text from the cache when it was sampled before.

    The cache key holds everything the sampled tokens depend on: the model's weights, the tokenizer's start and
    padding tokens, the amount, window length, seed, sampling batch and precision."""
    if model is None:
        raise UserError("recover.data 'self' samples text from the dense model, so a model is needed")
    key = {"weights": weights_hash(model), "start": start_tokens(tokenizer), "seed_token": seed_token(tokenizer),
           "pad": tokenizer.pad_token_id, "n_tokens": n_tokens, "seq_len": seq_len, "seed": seed,
           "sample_batch": sample_batch, "precision": precision, "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = cache_dir() / "self_text" / f"{digest}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return TokenBatch.build(list(saved["ids"]), saved["source"], "pack", start=saved["start"].tolist())
    batch = make_sequences(tokenizer, "self", n_tokens=n_tokens, seq_len=seq_len, mode="pack", seed=seed,
                           model=model, sample_batch=sample_batch, sample_precision=precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"ids": torch.stack(batch.sequences), "source": batch.source,
                "start": torch.tensor(batch.start, dtype=torch.long)}, tmp)
    os.replace(tmp, path)  # a half-written file is never visible under the final name
    return batch
