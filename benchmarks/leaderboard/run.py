"""Run the leaderboard grid for one model: every grid recipe of that model under one pinned protocol.

    python benchmarks/leaderboard/run.py --model smollm2-135m            # all cells, resumable
    python benchmarks/leaderboard/run.py --model smollm2-135m --cells 'wanda_sp-*' 'fbn-30'
    python benchmarks/leaderboard/board.py                                # tables, CSV and plots

The cells are the grid recipes ``grid/<model>/*.yaml`` (method, sparsity, allocation,
compensation); their evaluate sections are replaced by ``protocol.yaml``, so every method is measured the same
way. The model is loaded once; calibration activations and networks are computed once (cached by content) and
reused by every cell; each cell prunes a fresh copy of the dense model. One JSON per cell goes to
``results/<model>/<cell>.json``; finished cells are skipped, so an interrupted run resumes where it stopped.

    python benchmarks/leaderboard/run.py --model smollm2-135m --carry-from v2

carries the cells of an archived version over (``v2/results/<model>/``) when that version fed the model the same
token sequences: the cell is pruned again and only what the older protocol lacked (the retention column) is
measured; its perplexities and accuracies are the archived ones, and the cell says where they came from.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from fbnprune.collect import make_sequences  # noqa: E402
from fbnprune.evaluate import next_token_agreement  # noqa: E402
from fbnprune.evaluate.ppl import perplexity, token_stream  # noqa: E402
from fbnprune.models import LoadedModel  # noqa: E402
from fbnprune.models.feed import feed_info  # noqa: E402
from fbnprune.provenance import machine  # noqa: E402
from fbnprune.recipe import load_recipe  # noqa: E402
from fbnprune.run import Run, collect_stage, discover_stage, load, plan_stage, provenance, prune_stage, say  # noqa: E402


def protocol() -> dict[str, Any]:
    return yaml.safe_load((HERE / "protocol.yaml").read_text())


def retention(dense: Any, model: Any, held: Any) -> dict[str, Any]:
    """KL(dense || pruned) and top-1 agreement on the protocol's held-out text."""
    out = next_token_agreement(dense, model, held.sequences)
    return {**out, "source": held.source, **feed_info(held.start), "sha256": held.sha256}


def evaluate(model: Any, tokenizer: Any, proto: dict[str, Any], streams: dict[int, Any]) -> dict[str, Any]:
    from fbnprune.evaluate.harness import evaluate_tasks

    out: dict[str, Any] = {}
    for seq_len, toks in streams.items():
        r = perplexity(model, toks, seq_len=seq_len, batch_size=max(1, 4096 // seq_len), desc=f"ppl@{seq_len}")
        out[f"ppl{seq_len}"] = r
    sub = proto["task_subset"]
    t = evaluate_tasks(model, tokenizer, proto["tasks"], batch_size=proto["batch_size"],
                       subset=sub["items"], subset_seed=sub["seed"])
    out["tasks"] = t
    return out


def share_scores() -> None:
    """Let cells that differ only in allocation or compensation share their neuron scores.

    Every cell prunes a fresh copy of the same dense model with the same store and networks, and scores depend
    only on the method, its rule, ridge, seed and the sparsity (not on allocation or compensation), so fbn,
    fbn-bias and fbn-global at one sparsity need one scoring, not three (the redundancy rule takes about a minute
    per scoring on SmolLM2)."""
    import fbnprune.run as run_mod

    memo: dict[tuple[Any, ...], Any] = {}
    score = run_mod.score_neurons

    def cached(method: str, ctx: Any) -> Any:
        o = ctx.options
        key = (method, ctx.seed, o.get("fbn_rule"), o.get("ridge"), o.get("sparsity"))
        if key not in memo:
            memo[key] = score(method, ctx)
        else:
            say(f"scores of {key} reused from an earlier cell")
        return [s.clone() for s in memo[key]]

    run_mod.score_neurons = cached


def cell_names(model: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((HERE / "grid" / model).glob("*.yaml"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--cells", nargs="*", default=["*"], help="glob patterns of cell names (default: all)")
    ap.add_argument("--carry-from", metavar="VERSION",
                    help="take perplexities and accuracies from this archived version's cells (same token sequences)")
    args = ap.parse_args(argv)
    proto = protocol()
    share_scores()
    # cells run in the order of the patterns given (then by name), so the most informative can go first
    order = {n: min(i for i, pat in enumerate(args.cells) if fnmatch.fnmatch(n, pat))
             for n in cell_names(args.model) if any(fnmatch.fnmatch(n, pat) for pat in args.cells)}
    cells = {n: cell_names(args.model)[n] for n in sorted(order, key=lambda n: (order[n], n))}
    out_dir = HERE / "results" / args.model
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [n for n in cells if not (out_dir / f"{n}.json").is_file()]
    say(f"{args.model}: {len(cells)} cells selected, {len(cells) - len(todo)} already done, {len(todo)} to run")
    dense_file = out_dir / "dense.json"
    if not todo and dense_file.is_file():
        return 0
    c = proto["calibration"]
    calib = [f"collect.source={c['source']}", f"collect.n_tokens={c['n_tokens']}", f"collect.seq_len={c['seq_len']}",
             f"collect.seed={c['seed']}", f"collect.drop_first={c['drop_first']}", "collect.keep_activations=true"]
    first = load_recipe(next(iter(cells.values())), calib)
    base = load(first)
    collect_stage(base)
    dense_model = base.lm.model
    pp = proto["perplexity"]
    streams = {L: token_stream(base.lm.tokenizer, pp["source"], pp["max_tokens"]) for L in pp["seq_lens"]}
    rp = proto["retention"]
    held = make_sequences(base.lm.tokenizer, rp["source"], n_tokens=rp["n_tokens"], seq_len=rp["seq_len"],
                          seed=rp["seed"])
    assert base.calib is not None
    meta = {"protocol": proto, "machine": machine(), "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
            "calibration": {**feed_info(base.calib.start), "sha256": base.calib.sha256,
                            "tokens": base.calib.n_tokens}}
    carried = HERE / args.carry_from / "results" / args.model if args.carry_from else None
    if carried is not None and not carried.is_dir():
        raise SystemExit(f"no archived cells at {carried}")
    if not dense_file.is_file():
        t0 = time.perf_counter()
        old = carried / "dense.json" if carried is not None else None
        extra: dict[str, Any] = {}
        if old is not None and old.is_file():
            res = json.loads(old.read_text())["eval_info"]
            extra["carried_from"] = f"{args.carry_from}/results/{args.model}/dense.json (perplexity, tasks)"
        else:
            res = evaluate(dense_model, base.lm.tokenizer, proto, streams)
        from fbnprune.prune.plan import count_params

        res["params"] = count_params(dense_model)
        _write(dense_file, {"run_info": {"cell": "dense", "method": "dense", "sparsity": 0.0, "allocation": "-",
                                         "compensate": "none"},
                            "eval_info": res, "meta_info": dict(meta, **extra,
                                                                 seconds=round(time.perf_counter() - t0, 1),
                                                                 provenance=provenance(first, base.lm.info))})
    for name in todo:
        t0 = time.perf_counter()
        recipe = load_recipe(cells[name], calib)
        lm = LoadedModel(model=copy.deepcopy(dense_model), tokenizer=base.lm.tokenizer, source=base.lm.source,
                         info=base.lm.info)
        r = Run(recipe=recipe, lm=lm, adapter=base.adapter, have_data=base.have_data, calib=base.calib,
                store=base.store)
        say(f"cell {name}")
        discover_stage(r)
        plan_stage(r)
        prune_stage(r)
        old = carried / f"{name}.json" if carried is not None else None
        extra: dict[str, Any] = {}
        if old is not None and old.is_file():  # the older protocol measured the rest on the same tokens
            res = json.loads(old.read_text())["eval_info"]
            extra["carried_from"] = f"{args.carry_from}/results/{args.model}/{name}.json (perplexity, tasks)"
        else:
            res = evaluate(r.lm.model, r.lm.tokenizer, proto, streams)
        res["retention"] = retention(dense_model, r.lm.model, held)
        say(f"{name}: KL(dense||pruned) {res['retention']['kl']:.4f}, top-1 agreement "
            f"{res['retention']['top1_agreement']:.2%}")
        from fbnprune.prune.plan import count_params

        res["params"] = count_params(r.lm.model)
        p = recipe.prune
        _write(out_dir / f"{name}.json", {
            "run_info": {"cell": name, "recipe": recipe.model_dump(mode="json"), "method": p.method,
                         "fbn_rule": p.fbn_rule if p.method == "fbn" else None,
                         "sparsity": r.plan.sparsity, "target_sparsity": p.sparsity, "allocation": p.allocation,
                         "compensate": p.compensate, "kept_widths": r.plan.kept_widths},
            "eval_info": res,
            "meta_info": dict(meta, **extra, seconds=round(time.perf_counter() - t0, 1),
                              loadavg_at_end=os.getloadavg(), provenance=provenance(recipe, base.lm.info)),
        })
        del r, lm
    return 0


def _write(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
    say(f"wrote {path.relative_to(HERE)}")


if __name__ == "__main__":
    raise SystemExit(main())
