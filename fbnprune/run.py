"""The whole pipeline, top to bottom: load -> collect -> (discover) -> score -> prune -> evaluate -> export.

Kept deliberately as one readable function: each step is a call into its stage package. The output directory is
built under a hidden temporary name and renamed at the end, so a failed run leaves no partial output.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from fbnprune import __version__
from fbnprune.arch import get_adapter
from fbnprune.collect import collect, make_sequences
from fbnprune.collect.sources import DATA_FILES
from fbnprune.errors import UserError
from fbnprune.evaluate import next_token_agreement, perplexity
from fbnprune.evaluate.ppl import token_stream
from fbnprune.export.hf import atomic_dir, export_hf
from fbnprune.models import load_model
from fbnprune.paths import data_dir
from fbnprune.prune import ScoreContext, apply_plan_, make_plan, score_neurons
from fbnprune.prune.plan import count_params
from fbnprune.recipe.load import dump_recipe
from fbnprune.recipe.schema import Recipe

log = logging.getLogger("fbnprune")


def say(msg: str) -> None:
    print(f"[fbnprune] {msg}", flush=True)


def _needs_data(source: str) -> bool:
    return source in DATA_FILES


def provenance(recipe: Recipe, model_info: dict[str, Any]) -> dict[str, Any]:
    """Versions, seeds, machine and model/data identity for a results or export directory."""
    import subprocess

    import transformers

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        sha = None
    try:
        import lm_eval

        lm_eval_version = getattr(lm_eval, "__version__", "unknown")
    except ImportError:
        lm_eval_version = None
    return {
        "fbnprune": __version__,
        "git_sha": sha,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval_version,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}, {torch.get_num_threads()} threads",
        "seed": recipe.seed,
        "model": model_info,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run(recipe: Recipe, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``recipe`` end to end; returns the report (also written as ``report.json``)."""
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    out = Path(output_dir or recipe.output_dir or f"outputs/{recipe.name}")
    report: dict[str, Any] = {"recipe": recipe.name, "notes": []}

    def note(msg: str) -> None:
        say(msg)
        report["notes"].append(msg)

    say(f"loading model {recipe.model.source!r} ({recipe.model.dtype})")
    lm = load_model(recipe.model.source, dtype=recipe.model.dtype, device=recipe.model.device)
    model, tok = lm.model, lm.tokenizer
    adapter = get_adapter(model)
    have_data = data_dir() is not None

    # ---------------------------------------------------------------- collect
    store = None
    calib = None
    if recipe.collect is not None:
        c = recipe.collect
        source = c.source
        if _needs_data(source) and not have_data:
            if not c.fallback:
                raise UserError(f"collect.source {source!r} needs the data directory, and collect.fallback is off")
            note(f"no data directory found: calibrating on {c.fallback!r} instead of {source!r} (data-free)")
            source = c.fallback
        calib = make_sequences(tok, source, n_tokens=c.n_tokens, seq_len=c.seq_len, mode=c.mode, seed=c.seed, model=model)
        say(f"calibration: {calib.n_tokens} tokens from {calib.source} ({len(calib.sequences)} sequences)")
        store = collect(model, calib, model_info=lm.info, batch_size=c.batch_size,
                        keep_activations=c.keep_activations, drop_first=c.drop_first)
        report["calibration"] = {"source": calib.source, "tokens": calib.n_tokens, "rows": store.n_rows,
                                 "sha256": calib.sha256, "store": str(store.path)}

    # ---------------------------------------------------------------- evaluation inputs, dense model
    ev = recipe.evaluate
    ppl_inputs: list[tuple[Any, torch.Tensor]] = []
    held_out = None
    if ev is not None:
        for pc in ev.perplexity:
            if _needs_data(pc.source) and not have_data:
                note(f"no data directory: skipping perplexity on {pc.source!r}")
                continue
            ppl_inputs.append((pc, token_stream(tok, pc.source, pc.max_tokens)))
        if ev.retention is not None:
            rc = ev.retention
            src = rc.source if (have_data or not _needs_data(rc.source)) else "self"
            held_out = make_sequences(tok, src, n_tokens=rc.n_tokens, seq_len=rc.seq_len, seed=rc.seed, model=model)
    dense = copy.deepcopy(model) if held_out is not None else None
    dense_params = count_params(model)
    results: dict[str, Any] = {"dense": {"params": dense_params}, "pruned": {}}
    for pc, toks in ppl_inputs:
        r = perplexity(model, toks, seq_len=pc.seq_len, batch_size=pc.batch_size, desc="dense perplexity")
        results["dense"][f"ppl_{pc.source}_{pc.seq_len}"] = r
        say(f"dense perplexity ({pc.source}, {r['windows']} windows x {pc.seq_len} tokens): {r['ppl']:.3f}")

    # ---------------------------------------------------------------- score, plan, prune
    p = recipe.prune
    ctx = ScoreContext(model=model, adapter=adapter, store=store,
                       sequences=calib.sequences if calib is not None else None, seed=p.seed)
    scores = score_neurons(p.method, ctx)
    plan = make_plan(scores, sparsity=p.sparsity, param_fraction=p.param_fraction, model=model, adapter=adapter,
                     allocation=p.allocation, protected=p.protected_layers, min_width=p.min_width,
                     round_to=p.round_to)
    plan.info["method"] = p.method
    if p.compensate == "bias":
        from fbnprune.prune.compensate import bias_compensation_

        assert store is not None
        bias_compensation_(model, plan, store)
    apply_plan_(model, plan, mode=p.mode)
    pruned_params = count_params(model)
    say(f"pruned with {p.method!r}: {plan.sparsity:.2%} of MLP neurons removed "
        f"(widths {sorted(set(plan.kept_widths))}), params {dense_params:,} -> {pruned_params:,}")
    results["pruned"]["params"] = pruned_params
    results["plan"] = {k: v for k, v in plan.to_json().items() if k != "keep"}

    # ---------------------------------------------------------------- evaluate pruned
    for pc, toks in ppl_inputs:
        r = perplexity(model, toks, seq_len=pc.seq_len, batch_size=pc.batch_size, desc="pruned perplexity")
        results["pruned"][f"ppl_{pc.source}_{pc.seq_len}"] = r
        say(f"pruned perplexity ({pc.source}, {r['windows']} windows x {pc.seq_len} tokens): {r['ppl']:.3f}")
    if held_out is not None and dense is not None:
        r = next_token_agreement(dense, model, held_out.sequences)
        r["source"] = held_out.source
        results["pruned"]["retention"] = r
        say(f"data-free retention on {held_out.n_tokens} held-out tokens from {held_out.source}: "
            f"KL(dense||pruned) = {r['kl']:.4f} nats/token, top-1 agreement = {r['top1_agreement']:.2%}")
        del dense
    if ev is not None and ev.tasks:
        from fbnprune.evaluate.harness import evaluate_tasks

        results["tasks"] = evaluate_tasks(model, tok, ev.tasks, limit=ev.limit, batch_size=ev.batch_size)
    report["results"] = results
    report["provenance"] = provenance(recipe, lm.info)
    report["seconds"] = round(time.perf_counter() - t_start, 1)

    # ---------------------------------------------------------------- write outputs atomically
    def write(tmp: Path) -> None:
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        plan.save(tmp / "keep_plan.json")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
        if recipe.export is not None and recipe.export.enabled and p.mode == "slice":
            export_hf(model, tok, tmp / recipe.export.subdir,
                      extra_json={"fbnprune_provenance.json": report["provenance"],
                                  "fbnprune_keep_plan.json": plan.to_json()},
                      extra_text={"fbnprune_recipe.yaml": dump_recipe(recipe)})

    atomic_dir(out, write)
    say(f"wrote {out}/ (report.json, keep_plan.json, recipe.yaml"
        + (f", {recipe.export.subdir}/ stock-loadable checkpoint" if recipe.export and recipe.export.enabled and p.mode == 'slice' else "")
        + f") in {report['seconds']} s")
    return report
