"""The one runner every benchmark harness stands on: load once, calibrate once, prune a fresh copy per cell,
measure it under a protocol, write one JSON per cell, skip what is done, and say who measured what, where.

Why one: the leaderboard, the fbn rule study, the baseline grid and the evaluation suite each coded the same
sequence (load, calibrate, collect, score, perplexity) and their own ``machine()`` and ``git_sha()``; the copies
drifted (one recorded the load average, another the CPU model, one a ``nice`` the command never ran under). Here
the pipeline is fbnprune's own (:mod:`fbnprune.run`'s ``load``, ``collect_stage``, ``discover_stage``,
``plan_stage``, ``prune_stage``), so a benchmark cell prunes exactly as ``python -m fbnprune run`` does, and the
provenance is :mod:`fbnprune.provenance`'s, so every results file answers the same questions.

Each harness keeps its own command line and its own results layout (their readers and committed files predate
this module); what it takes from here:

* :class:`Bench`: the model loaded and calibrated once; :meth:`Bench.cell` gives a :class:`fbnprune.run.Run` on a
  deep copy of the dense model that shares the calibration store, :meth:`Bench.prune` runs the stages on it;
* :class:`Protocol` and :meth:`Bench.evaluate`: perplexity at fixed window lengths on one token stream, lm-eval
  tasks, data-free retention (KL and top-1 agreement with the dense model on held-out sequences);
* :class:`CellDir` and :func:`write_json`: one JSON per cell, written under a temporary name and renamed, so an
  interrupted run leaves finished cells or nothing, and a rerun skips the finished ones;
* :func:`record`, :func:`command_line`: command, date, machine and versions (the git commit among them);
* :func:`share_scores`: cells that differ only in what happens after scoring reuse one scoring.

Scripts import it as ``benchmarks.runner`` after putting the checkout's root on ``sys.path`` (they run as files,
not as a package).
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fbnprune.run as pipeline
from fbnprune.collect import TokenBatch, make_sequences
from fbnprune.errors import UserError
from fbnprune.evaluate import next_token_agreement
from fbnprune.evaluate.ppl import TokenStream, perplexity, token_stream
from fbnprune.models import LoadedModel
from fbnprune.models.feed import feed_info
from fbnprune.provenance import machine, versions
from fbnprune.recipe.schema import Recipe
from fbnprune.run import Run, collect_stage, discover_stage, load, needs_data, plan_stage, prune_stage, say


# ------------------------------------------------------------------------------------------------ provenance
def now() -> str:
    """UTC date and time, the form every results file uses."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def command_line(argv: list[str] | None = None) -> str:
    """The command as it could be typed again: thread settings and niceness it ran under, the interpreter (relative
    to the working directory when inside it, e.g. ``.venv/bin/python``), and the arguments quoted."""
    argv = sys.argv if argv is None else argv
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ]
    niceness = os.nice(0) if hasattr(os, "nice") else 0
    exe = Path(sys.executable)
    try:
        python = str(exe.relative_to(Path.cwd()))
    except ValueError:
        python = exe.name
    return " ".join([*env, *(["nice", "-n", str(niceness)] if niceness > 0 else []), python,
                     *(shlex.quote(a) for a in argv)])


def record(command: str | None = None) -> dict[str, Any]:
    """Command, date, machine (with its load right now) and versions (fbnprune, torch, transformers, lm-eval,
    Python and the git commit) for a results file."""
    return {"command": command or command_line(), "date": now(), "machine": machine(), "versions": versions()}


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON under a temporary name, then rename: a reader (or a resumed run) sees the whole file or
    none of it, never the half a killed process left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when there is no file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass(frozen=True)
class CellDir:
    """A folder of results, one ``<cell>.json`` each: a cell whose file exists is finished, so a rerun of the same
    command measures only what is missing."""

    path: Path

    def file(self, name: str) -> Path:
        return Path(self.path) / f"{name}.json"

    def done(self, name: str) -> bool:
        return self.file(name).is_file()

    def todo(self, names: Iterable[str]) -> list[str]:
        """``names`` without the finished cells, in the order given."""
        return [n for n in names if not self.done(n)]

    def read(self, name: str) -> dict[str, Any] | None:
        return read_json(self.file(name))

    def write(self, name: str, obj: dict[str, Any], indent: int | None = 2) -> Path:
        path = self.file(name)
        write_json(path, obj, indent)
        say(f"wrote {path}")
        return path


# ------------------------------------------------------------------------------------------------ protocol
@dataclass(frozen=True)
class Protocol:
    """How a cell is measured. Every part is optional: a harness names what its results hold.

    ``seq_lens``: perplexity on the first ``ppl_tokens`` tokens of ``ppl_source`` in non-overlapping windows of each
    length (one token stream, so every length scores the same text); ``batch_tokens`` tokens per forward pass.
    ``tasks``: lm-eval tasks through :func:`fbnprune.evaluate.harness.evaluate_tasks` with ``task_options`` (subset,
    limit, batch size ... as that function names them). ``retention``: ``source``, ``n_tokens``, ``seq_len``,
    ``seed`` of held-out sequences on which the pruned model's next-token distribution is compared with the dense
    one's (KL and top-1 agreement): text that is neither calibration nor evaluation text.
    """

    seq_lens: tuple[int, ...] = ()
    ppl_source: str = "wikitext2-test"
    ppl_tokens: int | None = 8192
    batch_tokens: int = 4096
    tasks: tuple[str, ...] = ()
    task_options: Mapping[str, Any] = field(default_factory=dict)
    retention: Mapping[str, Any] | None = None
    progress: bool = True


# ------------------------------------------------------------------------------------------------ bench
class Bench:
    """One model, loaded and calibrated once, from which every cell prunes a fresh copy.

    ``recipe`` gives the model and the calibration (its ``collect`` section); the calibration store and the
    networks discovered from it are cached by content, so cells that share them pay for them once. A benchmark
    never falls back to self-generated calibration text when the data directory is missing (a product run does):
    a cell calibrated on other text could not be compared with the rest. ``calibrate=False`` loads only (a harness
    that measures the dense model needs no calibration).
    """

    def __init__(self, recipe: Recipe, protocol: Protocol | None = None, *, calibrate: bool = True,
                 command: str | None = None) -> None:
        self.recipe = recipe
        self.protocol = protocol or Protocol()
        self.command = command or command_line()
        self.base = load(recipe)
        c = recipe.collect
        if calibrate and c is not None:
            if needs_data(c.source) and not self.base.have_data:
                raise UserError(f"calibration source {c.source!r} needs the data directory ($FBNPRUNE_DATA or "
                                "../shared/data); a benchmark does not fall back to self-generated text")
            collect_stage(self.base)
        self._streams: dict[tuple[str, int | None], TokenStream] = {}
        self._held: TokenBatch | None = None

    @property
    def dense(self) -> Any:
        """The dense model: never pruned, every cell copies it."""
        return self.base.lm.model

    @property
    def tokenizer(self) -> Any:
        return self.base.lm.tokenizer

    def provenance(self, recipe: Recipe | None = None) -> dict[str, Any]:
        """:func:`fbnprune.run.provenance` for ``recipe`` (default: the bench's): versions, machine, seed, model
        identity and date, as a product run records them."""
        return pipeline.provenance(recipe or self.recipe, self.base.lm.info)

    def recipe_with(self, **prune: Any) -> Recipe:
        """The bench's recipe with these ``prune`` settings (validated: an unknown method or setting fails here)."""
        data = self.recipe.model_dump(mode="json")
        data["prune"] = {**data["prune"], **prune}
        return Recipe.model_validate(data)

    def cell(self, recipe: Recipe) -> Run:
        """A run of ``recipe`` on a deep copy of the dense model, sharing the bench's calibration and store: the
        stages may prune it in place, and the dense model stays as it was for the next cell."""
        lm = LoadedModel(model=copy.deepcopy(self.dense), tokenizer=self.tokenizer, source=self.base.lm.source,
                         info=self.base.lm.info)
        return Run(recipe=recipe, lm=lm, adapter=self.base.adapter, have_data=self.base.have_data,
                   calib=self.base.calib, store=self.base.store)

    def prune(self, recipe: Recipe) -> Run:
        """A fresh copy pruned by ``recipe``'s prune section through fbnprune's stages (networks when the method
        needs them, scores and keep plan, compensation, surgery); ``report["seconds"]`` times each stage."""
        r = self.cell(recipe)
        seconds = {}
        for name, stage in (("discover", discover_stage), ("plan", plan_stage), ("prune", prune_stage)):
            t0 = time.perf_counter()
            stage(r)
            seconds[name] = round(time.perf_counter() - t0, 1)
        r.report["seconds"] = seconds
        return r

    # -------------------------------------------------------------------------------------------- measurements
    def stream(self) -> TokenStream:
        """The protocol's perplexity text as one token stream (tokenised once per bench)."""
        p = self.protocol
        key = (p.ppl_source, p.ppl_tokens)
        if key not in self._streams:
            self._streams[key] = token_stream(self.tokenizer, p.ppl_source, p.ppl_tokens)
        return self._streams[key]

    def perplexity(self, model: Any, seq_len: int, desc: str | None = None) -> dict[str, Any]:
        """Perplexity of ``model`` in windows of ``seq_len`` tokens of the protocol's stream."""
        return perplexity(model, self.stream(), seq_len=seq_len, batch_size=max(1, self.protocol.batch_tokens // seq_len),
                          desc=desc or f"ppl@{seq_len}", progress=self.protocol.progress)

    def tasks(self, model: Any, names: Iterable[str] | None = None) -> dict[str, Any]:
        """lm-eval tasks (default: the protocol's) with the protocol's task options."""
        # imported here: it imports lm-eval, which takes seconds, and only task runs need it
        from fbnprune.evaluate.harness import evaluate_tasks

        opts = {"progress": self.protocol.progress, **self.protocol.task_options}
        return evaluate_tasks(model, self.tokenizer, list(names or self.protocol.tasks), **opts)

    def held_out(self) -> TokenBatch:
        """The protocol's held-out retention sequences (sampled once per bench)."""
        rp = self.protocol.retention
        if rp is None:
            raise UserError("this protocol has no retention section")
        if self._held is None:
            self._held = make_sequences(self.tokenizer, rp["source"], n_tokens=rp["n_tokens"], seq_len=rp["seq_len"],
                                        seed=rp["seed"], mode=rp.get("mode", "pack"))
        return self._held

    def retention(self, model: Any) -> dict[str, Any]:
        """KL(dense || model) per token and top-1 agreement with the dense model on the held-out sequences, with
        what those sequences were (source, start tokens, hash)."""
        held = self.held_out()
        out = next_token_agreement(self.dense, model, held.sequences, progress=self.protocol.progress)
        return {**out, "source": held.source, **feed_info(held.start), "sha256": held.sha256}

    def evaluate(self, model: Any, label: str = "") -> dict[str, Any]:
        """Every part of the protocol on ``model``: ``ppl<seq_len>`` per window length, ``tasks`` when the protocol
        has tasks, ``retention`` when it has a retention section and ``model`` is not the dense model itself."""
        out: dict[str, Any] = {}
        for seq_len in self.protocol.seq_lens:
            out[f"ppl{seq_len}"] = self.perplexity(model, seq_len, f"{label} ppl@{seq_len}".strip())
        if self.protocol.tasks:
            out["tasks"] = self.tasks(model)
        if self.protocol.retention is not None and model is not self.dense:
            out["retention"] = self.retention(model)
        return out


# ------------------------------------------------------------------------------------------------ scores
def share_scores(key: Callable[[str, Any], tuple[Any, ...]] | None = None) -> dict[tuple[Any, ...], Any]:
    """Let cells whose scoring is the same share one scoring, for the rest of this process.

    Every cell prunes a copy of the same dense model with the same store and networks, and a scorer's output
    depends only on the method and its settings, not on what the plan and the compensation do afterwards; so fbn,
    fbn-bias and fbn-global at one sparsity need one scoring, not three (the redundancy rule takes about a minute
    per scoring on SmolLM2). The default key is the method, seed, fbn rule, ridge and sparsity (elimination scorers
    stop at the sparsity, so it is part of the key for every method). Replaces the scoring that
    :func:`fbnprune.run.plan_stage` calls; returns the memo. Each cell gets its own copy of the scores."""
    memo: dict[tuple[Any, ...], Any] = {}
    score = getattr(pipeline.score_neurons, "__wrapped__", pipeline.score_neurons)

    def default_key(method: str, ctx: Any) -> tuple[Any, ...]:
        o = ctx.options
        return (method, ctx.seed, o.get("fbn_rule"), o.get("ridge"), o.get("sparsity"))

    keyed = key or default_key

    def cached(method: str, ctx: Any) -> Any:
        k = keyed(method, ctx)
        if k not in memo:
            memo[k] = score(method, ctx)
        else:
            say(f"scores of {k} reused from an earlier cell")
        return [s.clone() for s in memo[k]]

    cached.__wrapped__ = score  # type: ignore[attr-defined]  # a second call wraps the real scorer, not this one
    pipeline.score_neurons = cached
    return memo
