"""lm-evaluation-harness around the in-memory model, so a pruned model is evaluated without exporting it first.

``evaluate_tasks`` wraps the loaded model and tokenizer in lm-eval's ``HFLM`` and runs lm-eval's own evaluator on
offline tasks (``fbnprune.evaluate.tasks``: same prompts, choices and metrics as the standard tasks, read from
the local data directory) or, for any other name, on lm-eval's standard task (needs the Hub or a local HF cache).
``lm_eval:<name>`` forces the standard task even where an offline one exists.

Scoring engine. ``engine="packed"`` (default) is ``HFLM`` with one method replaced: the log-likelihood requests
that share a context (the choices of one multiple-choice question) are packed into one row — the context once,
then every continuation — with a tree-shaped attention mask and matching position ids, and the output head is
applied only where a continuation token is predicted. The numbers equal lm-eval's own loop up to float rounding
(``tests/evaluate/test_harness.py`` checks this), and the suite runs several times faster on a CPU because a
multiple-choice context is encoded once, not once per choice. ``engine="hflm"`` uses lm-eval's loop unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.errors import UserError
from fbnprune.evaluate.ppl import split_head

log = logging.getLogger("fbnprune")

ENGINES = ("packed", "hflm")
LIMIT_NOTE = "limit was set: only the first {limit} items of each task were scored (smoke test, not a result)"


# ----------------------------------------------------------------------------------------------- packed scoring
def _pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Greedy first-fit of groups (by length, longest first) into rows of at most ``row_tokens`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for r in range(len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max(row_tokens, n) - n)
    return rows


def _additive(allowed: torch.Tensor, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """Boolean (batch, T, T) 'may attend' -> additive (batch, 1, T, T) mask in the model's dtype (works for
    eager and sdpa attention alike)."""
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None].to(device)


def _uses_sliding_layers(config: Any) -> int | None:
    types = getattr(config, "layer_types", None) or []
    win = getattr(config, "sliding_window", None)
    return int(win) if win and "sliding_attention" in types else None


class PackedScorer:
    """Log-likelihoods of (context, continuation) token pairs, sharing each context across its continuations."""

    def __init__(self, model: Any, *, max_length: int, row_tokens: int = 512, rows_per_batch: int = 8) -> None:
        self.model = model
        split = split_head(model)
        if split is None:
            raise TypeError("model has no separate decoder/output head")
        self.decoder, self.logits = split
        self.window = _uses_sliding_layers(model.config)
        self.max_length = max_length
        self.row_tokens = row_tokens
        self.rows_per_batch = rows_per_batch

    @torch.no_grad()
    def score(self, pairs: Sequence[tuple[list[int], list[int]]], *, progress: bool = True
              ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is the greedy decode) for every pair, in order."""
        # group by (left-truncated) context, like lm-eval: keep the last max_length+1 tokens of context+continuation
        groups: dict[tuple[int, ...], list[int]] = {}
        conts: list[list[int]] = []
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError("context and continuation must be non-empty token lists")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            c = list(cont)[-len(full):]
            k = tuple(full[: len(full) - len(c)])
            if not k:  # continuation alone fills the window: keep its first token as context
                k, c = (c[0],), c[1:]
            conts.append(c)
            groups.setdefault(k, []).append(i)
        # a context shared by very many requests (blimp: every item has the same empty context) is split into
        # chunks of at most row_tokens packed tokens, each chunk carrying its own copy of the context
        keys: list[tuple[int, ...]] = []
        members: list[list[int]] = []
        for k, reqs in groups.items():
            cur: list[int] = []
            size = len(k)
            for ri in reqs:
                n = len(conts[ri]) - 1
                if cur and size + n > self.row_tokens:
                    keys.append(k)
                    members.append(cur)
                    cur, size = [], len(k)
                cur.append(ri)
                size += n
            keys.append(k)
            members.append(cur)
        glen = [len(k) + sum(len(conts[i]) - 1 for i in m) for k, m in zip(keys, members, strict=True)]
        rows = _pack_rows(glen, self.row_tokens)
        rows.sort(key=lambda r: -sum(glen[g] for g in r))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        bar = tqdm(total=len(pairs), desc="loglikelihood (packed)", unit="req", disable=not progress)
        for b in range(0, len(rows), self.rows_per_batch):
            batch = rows[b : b + self.rows_per_batch]
            T = max(sum(glen[g] for g in r) for r in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            pos = torch.zeros(len(batch), T, dtype=torch.long)
            grp = torch.empty(len(batch), T, dtype=torch.long)
            seg = torch.zeros(len(batch), T, dtype=torch.long)
            # per request: (row, [positions whose output predicts each continuation token])
            where: dict[int, tuple[int, list[int]]] = {}
            for r, row in enumerate(batch):
                t = 0
                for gi in row:
                    k = keys[gi]
                    L = len(k)
                    ids[r, t : t + L] = torch.tensor(k)
                    pos[r, t : t + L] = torch.arange(L)
                    grp[r, t : t + L] = gi
                    last_ctx = t + L - 1
                    t += L
                    for s, ri in enumerate(members[gi], 1):
                        c = conts[ri]
                        n = len(c) - 1
                        if n:
                            ids[r, t : t + n] = torch.tensor(c[:-1])
                            pos[r, t : t + n] = torch.arange(L, L + n)
                            grp[r, t : t + n] = gi
                            seg[r, t : t + n] = s
                        where[ri] = (r, [last_ctx, *range(t, t + n)])
                        t += n
                grp[r, t:] = -1 - torch.arange(T - t)  # padding: each pad token sees only itself
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            allowed = (grp[:, :, None] == grp[:, None, :]) & causal & (
                (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
            mask: Any = _additive(allowed, dtype, device)
            if self.window is not None:
                near = (pos[:, :, None] - pos[:, None, :]) < self.window
                mask = {"full_attention": mask, "sliding_attention": _additive(allowed & near, dtype, device)}
            hidden = self.decoder(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device),
                                  use_cache=False).last_hidden_state
            req = [ri for ri in where]
            sel_r = torch.tensor([where[ri][0] for ri in req for _ in where[ri][1]])
            sel_t = torch.tensor([p for ri in req for p in where[ri][1]])
            logp = F.log_softmax(self.logits(hidden[sel_r.to(device), sel_t.to(device)]), dim=-1)
            targets = torch.tensor([tok for ri in req for tok in conts[ri]], device=device)
            tok_lp = logp.gather(1, targets[:, None])[:, 0].cpu()
            greedy = (logp.argmax(-1) == targets).cpu()
            o = 0
            for ri in req:
                n = len(conts[ri])
                out[ri] = (float(tok_lp[o : o + n].sum()), bool(greedy[o : o + n].all()))
                o += n
            bar.update(len(req))
        bar.close()
        assert all(x is not None for x in out)
        return out  # type: ignore[return-value]


def make_lm(model: Any, tokenizer: Any, *, batch_size: int = 8, engine: str = "packed",
            row_tokens: int = 512, progress: bool = True) -> Any:
    """lm-eval ``HFLM`` around the loaded model (``engine='packed'``: with the packed log-likelihood loop)."""
    if engine not in ENGINES:
        raise UserError(f"unknown evaluation engine {engine!r}; choose one of {', '.join(ENGINES)}")
    from lm_eval.models.huggingface import HFLM

    from fbnprune.models.feed import adds_bos, seed_token

    # requests start the way the tokenizer starts a text, and an empty context is the same token text generated
    # from nothing starts with (fbnprune.models.feed): said explicitly, so no lm-eval default can change it
    feed = {"add_bos_token": adds_bos(tokenizer), "prefix_token_id": seed_token(tokenizer)}

    class RankedHFLM(HFLM):
        """HFLM that takes part in a multi-process run (:mod:`fbnprune.distributed`): HFLM given a loaded model
        assumes one process, so the rank, world size and collectives lm-eval's evaluator asks for are set here
        (the evaluator then gives each rank its share of every task's documents and gathers the metrics)."""

        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self._rank, self._world_size = dist.rank(), dist.world()

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.world_size <= 1:
                return tensor
            parts = dist.all_gather_object(tensor.detach().cpu().reshape(-1), what="lm-eval")
            return torch.cat(parts).to(tensor.device)

        def gather_object(self, obj: Any, dst: int = 0) -> Any:
            if self.world_size <= 1:
                return [obj]
            got = dist.all_gather_object(obj, what="lm-eval")
            return got if self.rank == dst else None

        def barrier(self) -> None:
            dist.barrier("lm-eval")

    if engine == "hflm":
        return RankedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **feed)

    class PackedHFLM(RankedHFLM):
        """HFLM whose log-likelihood loop shares each context across its continuations (see module doc)."""

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):  # type: ignore[override]
            try:
                scorer = PackedScorer(self.model, max_length=self.max_length, row_tokens=row_tokens,
                                      rows_per_batch=max(1, batch_size))
            except (TypeError, AttributeError):
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            res = scorer.score([(r[1], r[2]) for r in requests], progress=progress and not disable_tqdm)
            for r, ans in zip(requests, res, strict=True):
                if r[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", r[0], ans)
            return res

    return PackedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **feed)


# ----------------------------------------------------------------------------------------------- task runs
def _split_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    from fbnprune.evaluate.tasks import is_offline_task

    offline, standard = [], []
    for t in tasks:
        if not isinstance(t, str) or not t.strip():
            raise UserError(f"bad task name {t!r}")
        if t.startswith("lm_eval:"):
            standard.append(t[len("lm_eval:"):])
        elif is_offline_task(t):
            offline.append(t)
        else:
            standard.append(t)
    return offline, standard


def _check_standard(names: list[str], tm: Any) -> None:
    import difflib

    from fbnprune.evaluate.tasks import offline_task_names

    known = set(tm.all_tasks)
    for n in names:
        if n not in known:
            close = difflib.get_close_matches(n, [*offline_task_names(), *known], n=3)
            raise UserError(f"unknown task {n!r}: neither an offline task nor an lm-eval task"
                            + (f"; did you mean {', '.join(close)}?" if close else "")
                            + f". Offline tasks: {', '.join(offline_task_names()[:10])}, blimp_<paradigm>")


def _metrics(res: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in res.items():
        if "," not in key or key.startswith("alias"):
            continue
        metric, _filter = key.split(",", 1)
        if isinstance(val, (int, float)) and not (isinstance(val, float) and math.isnan(val)):
            out[metric] = float(val)
        elif val == "N/A":
            out[metric] = None
    return out


def _run(lm: Any, names: list[str], tm: Any, limit: int | None) -> dict[str, Any]:
    from lm_eval.evaluator import simple_evaluate

    try:
        res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=None,
                              log_samples=False, bootstrap_iters=1000, random_seed=0, numpy_random_seed=1234,
                              torch_random_seed=1234, fewshot_random_seed=1234)
    except (UserError, dist.PeerFailure):
        raise
    except Exception as e:  # lm-eval/datasets raise many types; name the tasks in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"lm-eval failed on tasks {names}: {type(e).__name__}: {msg}") from e
    return res if res is not None else {"results": {}, "n-samples": {}}  # ranks other than 0 get no results


def evaluate_tasks(model: Any, tokenizer: Any, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                   blimp_per_paradigm: int | None = 100, engine: str = "packed", progress: bool = True,
                   subset: int | None = None, subset_seed: int = 0) -> dict[str, Any]:
    """Zero-shot lm-eval tasks on the in-memory ``model``; every setting is recorded in the result.

    Args:
        tasks: offline task names (piqa, arc_easy, arc_challenge, boolq, winogrande, openbookqa, copa, sciq, blimp,
            blimp_<paradigm>, copa_balanced), any other lm-eval task name, or ``lm_eval:<name>``.
        limit: items per task, for smoke tests only (the result says so).
        batch_size: rows per forward pass (packed) or requests per forward pass (hflm).
        blimp_per_paradigm: score a fixed seeded subset of this many items of each blimp file (of 1000); None = all.
        engine: ``packed`` (default) or ``hflm`` (lm-eval's own loop).
        subset: score a fixed seeded subset of this many items of each offline (non-blimp) task; the result records
            it. Unlike ``limit`` this is a fair protocol for comparisons (the leaderboard uses it).
        subset_seed: seed of that subset.

    Returns: ``{"tasks": {name: {metric: value, metric_stderr: value, "items": n, ...}}, "settings": {...}}``.
    """
    from fbnprune.evaluate.tasks import prepare_offline_tasks

    if not tasks:
        raise UserError("evaluate_tasks needs at least one task name")
    if limit is not None and limit <= 0:
        raise UserError(f"limit must be a positive number of items, got {limit}")
    if blimp_per_paradigm is not None and blimp_per_paradigm <= 0:
        raise UserError(f"blimp_per_paradigm must be positive (or None for all items), got {blimp_per_paradigm}")
    per_par = blimp_per_paradigm
    offline, standard = _split_names(list(dict.fromkeys(tasks)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    was_training = model.training
    model.eval()
    lm = make_lm(model, tokenizer, batch_size=batch_size, engine=engine, progress=progress)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"tasks": {}}
    info: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    n_samples: dict[str, Any] = {}
    try:
        from lm_eval.tasks import TaskManager

        if offline:  # rank 0 writes the task files, every rank reads them
            prep = dist.broadcast_object(
                prepare_offline_tasks(offline, blimp_per_paradigm=per_par, subset=subset, subset_seed=subset_seed)
                if dist.is_main() else None, what="lm-eval task files")
            info = prep.info
            tm = TaskManager(include_path=str(prep.include_path), include_defaults=False)
            r = _run(lm, offline, tm, limit)
            raw.update(r["results"])
            n_samples.update(r.get("n-samples", {}))
        if standard:
            tm = TaskManager()
            _check_standard(standard, tm)
            r = _run(lm, standard, tm, limit)
            raw.update({f"lm_eval:{k}" if k in offline else k: v for k, v in r["results"].items()})
            n_samples.update(r.get("n-samples", {}))
    finally:
        model.train(was_training)
    if dist.is_main():
        out = _collect_results(out, raw, n_samples, info, tasks, offline, per_par)
    # lm-eval aggregates on rank 0 only; every rank returns its result
    out = dist.broadcast_object(out if dist.is_main() else None, what="lm-eval results")
    seconds = time.perf_counter() - t0
    import lm_eval

    from fbnprune.models.feed import feed_info, start_tokens

    out["settings"] = {
        "engine": engine,
        **feed_info(start_tokens(tokenizer)),
        "batch_size": batch_size,
        "num_fewshot": 0,
        "limit": limit,
        "limit_note": LIMIT_NOTE.format(limit=limit) if limit is not None else None,
        "blimp_per_paradigm": per_par,
        "subset": None if subset is None else {"items": subset, "seed": subset_seed},
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
        "processes": dist.world(),
        "seconds": round(seconds, 1),
    }
    if limit is not None:
        log.warning(out["settings"]["limit_note"])
    return out


def _collect_results(out: dict[str, Any], raw: dict[str, Any], n_samples: dict[str, Any], info: dict[str, Any],
                     tasks: list[str], offline: list[str], per_par: int | None) -> dict[str, Any]:
    """lm-eval's raw results as one entry per requested task (metrics, items, subset, source)."""
    for name in tasks:
        key = name[len("lm_eval:"):] if name.startswith("lm_eval:") and name[len("lm_eval:"):] not in offline else name
        if key not in raw:
            raise UserError(f"lm-eval returned no result for task {name!r}")
        entry = _metrics(raw[key])
        entry["source"] = "offline" if name in offline else "lm-eval standard (Hub data)"
        ns = n_samples.get(key, {})
        if ns:
            entry["items"] = ns.get("effective")
        if name in info:
            entry.update({k: v for k, v in info[name].items() if k != "items"})
            entry.setdefault("items", info[name]["items"])
        if name == "blimp":
            subs = {k: _metrics(v) | {"items": n_samples.get(k, {}).get("effective")}
                    for k, v in raw.items() if k.startswith("blimp_")}
            entry["items"] = sum(s["items"] or 0 for s in subs.values())
            entry["paradigms"] = len(subs)
            entry["subset"] = {"per_paradigm": per_par, "seed": 0}
            entry["subtasks"] = subs
        out["tasks"][name] = entry
    return out
