"""Text sources for calibration and evaluation.

A source name resolves to token sequences (1-D ``LongTensor`` each, at most ``seq_len`` long):

* data directory names (``$FBNPRUNE_DATA`` or ``../shared/data``): ``wikitext2-valid``, ``wikitext2-test``,
  ``c4``, ``wiki``, ``code``, ``technical``;
* a path to a ``.txt`` file (one document per line) or ``.jsonl`` file (field ``text``);
* ``hf:NAME[:CONFIG]:SPLIT[:FIELD]`` for a Hugging Face dataset (needs network or a local HF cache);
* ``self``: data-free, text sampled from the model itself (seeded), for machines with no data at all.

``pack`` mode concatenates the text and cuts seeded random windows of ``seq_len`` tokens (the usual pruning
calibration); ``document`` mode keeps each document as one sequence (truncated), which is what per-text ICA
blocks need. In every mode a sequence starts the way the tokenizer starts a text (:mod:`fbnprune.models.feed`):
with ``<bos>`` for Gemma, with nothing for SmolLM2; the start tokens count towards ``seq_len``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fbnprune.errors import UserError
from fbnprune.models.feed import seed_token, start_tokens
from fbnprune.models.load import autocast
from fbnprune.paths import data_dir
from fbnprune.registry import Registry

# name -> relative path inside the data directory
DATA_FILES: dict[str, str] = {
    "wikitext2-valid": "wikitext-2/valid.txt",
    "wikitext2-test": "wikitext-2/test.txt",
    "c4": "calibration/c4.utf8",
    "wiki": "calibration/wiki.utf8",
    "code": "calibration/code.utf8",
    "technical": "calibration/technical.utf8",
}

SOURCES: Registry[Callable[..., list[str]]] = Registry("text source")


@dataclass
class TokenBatch:
    """Token sequences plus what made them (recorded in provenance and cache keys).

    ``start`` is the tokens every sequence begins with (the tokenizer's own start of a text; may be empty)."""

    sequences: list[torch.Tensor]
    source: str
    mode: str
    sha256: str
    n_tokens: int
    doc_ids: list[int]
    start: list[int]

    @staticmethod
    def build(seqs: list[torch.Tensor], source: str, mode: str, doc_ids: list[int] | None = None,
              start: list[int] | None = None) -> TokenBatch:
        h = hashlib.sha256()
        for s in seqs:
            h.update(s.to(torch.int64).numpy().tobytes())
            h.update(b"|")
        return TokenBatch(
            sequences=seqs,
            source=source,
            mode=mode,
            sha256=h.hexdigest(),
            n_tokens=int(sum(len(s) for s in seqs)),
            doc_ids=doc_ids if doc_ids is not None else list(range(len(seqs))),
            start=list(start or []),
        )


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read text file {path}: {e.strerror}") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    out: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict) or field not in rec:
            raise UserError(f"{path}:{i}: record has no {field!r} field")
        out.append(str(rec[field]))
    return out


def load_texts(source: str) -> list[str]:
    """Documents of a named or file source (not ``self``). Raises :class:`UserError` when unavailable."""
    if source in DATA_FILES:
        root = data_dir()
        if root is None:
            raise UserError(
                f"text source {source!r} needs the data directory; set FBNPRUNE_DATA or use source 'self' (data-free)"
            )
        path = root / DATA_FILES[source]
        if not path.is_file():
            raise UserError(f"data file for {source!r} is missing: {path}")
        if source in ("wiki",):
            return [ln for ln in _read_lines(path) if not ln.startswith("<doc") and ln != "</doc>"]
        return _read_lines(path)
    if source.startswith("hf:"):
        return _load_hf(source)
    p = Path(source).expanduser()
    if p.suffix == ".jsonl":
        if not p.is_file():
            raise UserError(f"text file not found: {source}")
        return _read_jsonl(p)
    if p.suffix in (".txt", ".utf8", ".text", ".md"):
        if not p.is_file():
            raise UserError(f"text file not found: {source}")
        return _read_lines(p)
    known = ", ".join([*DATA_FILES, "self", "hf:NAME:SPLIT[:FIELD]", "<file>.txt", "<file>.jsonl"])
    raise UserError(f"unknown text source {source!r}; known: {known}")


def _load_hf(source: str) -> list[str]:
    parts = source[3:].split(":")
    if len(parts) < 2:
        raise UserError(f"bad Hugging Face source {source!r}; use hf:NAME[:CONFIG]:SPLIT[:FIELD]")
    name, rest = parts[0], parts[1:]
    config = rest[0] if len(rest) >= 3 else None
    split = rest[1] if len(rest) >= 3 else rest[0]
    field = rest[2] if len(rest) >= 3 else (rest[1] if len(rest) == 2 else "text")
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, missing dataset, ...
        raise UserError(f"cannot load Hugging Face dataset {source!r}: {str(e).splitlines()[0]}") from e
    return [str(t) for t in ds[field] if str(t).strip()]


def available_sources() -> list[str]:
    """Named sources usable on this machine right now (``self`` always is)."""
    root = data_dir()
    names = [n for n, rel in DATA_FILES.items() if root is not None and (root / rel).is_file()]
    return [*names, "self"]


def make_sequences(
    tokenizer: Any,
    source: str,
    *,
    n_tokens: int,
    seq_len: int,
    mode: str = "pack",
    seed: int = 0,
    model: Any = None,
    min_doc_tokens: int = 16,
    sample_batch: int = 8,
    sample_precision: str = "float32",
) -> TokenBatch:
    """Token sequences totalling about ``n_tokens`` tokens from ``source``.

    Args:
        tokenizer: the model's tokenizer.
        source: see module docstring.
        n_tokens: total tokens wanted (the last pack window is not cut short, so the total is a multiple of
            ``seq_len`` in ``pack`` mode).
        seq_len: tokens per sequence.
        mode: ``pack`` (random windows of concatenated text) or ``document`` (one sequence per document).
        seed: window selection / sampling seed.
        model: needed only for ``self``.
        min_doc_tokens: in ``document`` mode, shorter documents are skipped.
        sample_batch, sample_precision: for ``self``, sequences sampled at once and the precision of the
            model's matrix products (``bfloat16``: autocast). Larger batches sample several times as many tokens a
            second; a different batch or precision samples different text from the same seed.
    """
    if n_tokens <= 0 or seq_len < 2:
        raise UserError("n_tokens must be > 0 and seq_len >= 2")
    start = start_tokens(tokenizer)
    if seq_len < len(start) + 2:
        raise UserError(f"seq_len {seq_len} leaves fewer than 2 text tokens after the {len(start)} start token(s)")
    if source == "self":
        if model is None:
            raise UserError("source 'self' samples text from the model, so a model is needed")
        return _self_generated(model, tokenizer, n_tokens=n_tokens, seq_len=seq_len, seed=seed,
                               batch_size=sample_batch, precision=sample_precision)
    texts = load_texts(source)
    if not texts:
        raise UserError(f"text source {source!r} is empty")
    if mode == "pack":
        ids = _tokenize_concat(tokenizer, texts, limit=None)
        return pack_windows(ids, start, n_tokens=n_tokens, seq_len=seq_len, seed=seed, source=source)
    if mode == "document":
        seqs, docs, total = [], [], 0
        for i, t in enumerate(texts):
            body = tokenizer(t, add_special_tokens=False)["input_ids"][: seq_len - len(start)]
            s = torch.tensor([*start, *body], dtype=torch.long)
            if len(s) < min_doc_tokens:
                continue
            seqs.append(s)
            docs.append(i)
            total += len(s)
            if total >= n_tokens:
                break
        if total < n_tokens:
            raise UserError(f"source {source!r} has only {total} tokens in documents of >= {min_doc_tokens} tokens")
        return TokenBatch.build(seqs, source, mode, docs, start=start)
    raise UserError(f"unknown sequence mode {mode!r}; choose 'pack' or 'document'")


def pack_windows(ids: torch.Tensor, start: list[int], *, n_tokens: int, seq_len: int, seed: int,
                 source: str) -> TokenBatch:
    """Seeded random windows of ``seq_len`` tokens (``start`` tokens first) cut from the token stream ``ids``:
    ``pack`` mode of :func:`make_sequences`, for callers that hold a stream already (e.g. one part of a source,
    the rest held out for evaluation)."""
    n_win = len(ids) // seq_len
    want = -(-n_tokens // seq_len)
    if n_win < want:
        raise UserError(f"source {source!r} has {len(ids)} tokens, fewer than the {want * seq_len} requested")
    g = torch.Generator().manual_seed(seed)
    # windows sit on a grid of seq_len text tokens whatever the start tokens, so a tokenizer that adds none
    # gets exactly the windows it always got; with start tokens, each window's text is cut to make room
    starts = torch.randperm(n_win, generator=g)[:want].sort().values * seq_len
    head = torch.tensor(start, dtype=torch.long)
    seqs = [torch.cat([head, ids[s : s + seq_len - len(start)]]) for s in starts.tolist()]
    return TokenBatch.build(seqs, source, "pack", start=start)


def tokenize_source(tokenizer: Any, source: str, limit: int | None = None) -> torch.Tensor:
    """A named source's text as one token stream (documents joined by blank lines, no start tokens)."""
    texts = load_texts(source)
    if not texts:
        raise UserError(f"text source {source!r} is empty")
    return _tokenize_concat(tokenizer, texts, limit=limit)


def _tokenize_concat(tokenizer: Any, texts: list[str], limit: int | None) -> torch.Tensor:
    """Tokenise ``texts`` joined by blank lines as one stream (in chunks, so long files are fast)."""
    chunks: list[torch.Tensor] = []
    step = 256
    for i in range(0, len(texts), step):
        joined = "\n\n".join(texts[i : i + step]) + "\n\n"
        chunks.append(torch.tensor(tokenizer(joined, add_special_tokens=False)["input_ids"], dtype=torch.long))
        if limit is not None and sum(len(c) for c in chunks) >= limit:
            break
    return torch.cat(chunks)


@torch.no_grad()
def _self_generated(model: Any, tokenizer: Any, *, n_tokens: int, seq_len: int, seed: int, batch_size: int = 8,
                    precision: str = "float32") -> TokenBatch:
    """Sample calibration text from the model (no data needed); seeded and recorded like any other source.

    Generation starts from the tokenizer's start tokens, which the sequences keep; a tokenizer that starts a
    text with nothing gets its end-of-text token as the seed (a document boundary, as in training), which is
    then dropped, so the sequences start with text like every other source's."""
    from tqdm.auto import tqdm

    n_seq = -(-n_tokens // seq_len)
    start = start_tokens(tokenizer)
    prompt_ids = start or [seed_token(tokenizer)]
    keep_from = 0 if start else 1
    device = next(model.parameters()).device
    gen_bs = max(1, batch_size)
    seqs: list[torch.Tensor] = []
    torch.manual_seed(seed)
    for b in tqdm(range(0, n_seq, gen_bs), desc="sampling text (data-free)", unit="batch"):
        nb = min(gen_bs, n_seq - b)
        prompt = torch.tensor([prompt_ids] * nb, dtype=torch.long, device=device)
        new = seq_len - len(prompt_ids) + keep_from
        with autocast(device, precision):
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=tokenizer.pad_token_id,
            )
        seqs.extend(row[keep_from : keep_from + seq_len].cpu() for row in out)
    return TokenBatch.build(seqs, f"self(seed={seed})", "pack", start=start)
