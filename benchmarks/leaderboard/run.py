"""Run the leaderboard grid for one model: every grid recipe of that model under one pinned protocol.

    python benchmarks/leaderboard/run.py --model smollm2-135m            # all cells, resumable
    python benchmarks/leaderboard/run.py --model smollm2-135m --cells 'wanda_sp-*' 'fbn-30'
    python benchmarks/leaderboard/board.py                                # tables, CSV and plots

The cells are the grid recipes ``grid/<model>/*.yaml`` (method, sparsity, allocation,
compensation); their evaluate sections are replaced by ``protocol.yaml``, so every method is measured the same
way. The model is loaded once; calibration activations and networks are computed once (cached by content) and
reused by every cell; each cell prunes a fresh copy of the dense model (``benchmarks/runner.py``, fbnprune's own
stages). One JSON per cell goes to ``results/<model>/<cell>.json`` (``--results DIR``: ``DIR/<model>/``, e.g. for
a trial that must not touch the committed cells); finished cells are skipped, so an interrupted run resumes where it
stopped. Cells run in the order of the ``--cells`` patterns (then by name), so the most informative go first; a
cell that another run on the same folder finished meanwhile is skipped, so two runs (one per core) can share a
grid from its two ends.

    python benchmarks/leaderboard/run.py --model smollm2-135m --carry-from v2

carries the cells of an archived version over (``v2/results/<model>/``) when that version fed the model the same
token sequences: the cell is pruned again and only what the older protocol lacked (the retention column) is
measured; its perplexities and accuracies are the archived ones, and the cell says where they came from. A carried
cell must reproduce: the re-pruned model's perplexity at the longest window is measured again, and when it differs
from the archived one by more than ``CARRY_RTOL`` (code or discovery has changed since that version) the cell is
measured in full instead and says why (``meta_info.carry_refused``).
"""

from __future__ import annotations

import argparse
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

from benchmarks.runner import Bench, CellDir, Protocol, share_scores  # noqa: E402
from fbnprune.models.feed import feed_info  # noqa: E402
from fbnprune.provenance import machine  # noqa: E402
from fbnprune.prune.plan import count_params  # noqa: E402
from fbnprune.recipe import load_recipe  # noqa: E402
from fbnprune.run import say  # noqa: E402


def protocol() -> dict[str, Any]:
    return yaml.safe_load((HERE / "protocol.yaml").read_text())


def bench_protocol(proto: dict[str, Any]) -> Protocol:
    """``protocol.yaml`` as the runner's protocol: both window lengths on one stream, the task subset, retention."""
    pp, sub = proto["perplexity"], proto["task_subset"]
    return Protocol(seq_lens=tuple(pp["seq_lens"]), ppl_source=pp["source"], ppl_tokens=pp["max_tokens"],
                    tasks=tuple(proto["tasks"]),
                    task_options={"batch_size": proto["batch_size"], "subset": sub["items"], "subset_seed": sub["seed"]},
                    retention=proto.get("retention"))


def cell_names(model: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((HERE / "grid" / model).glob("*.yaml"))}


def ordered_cells(model: str, patterns: list[str]) -> dict[str, Path]:
    """The grid cells matching any of ``patterns``, in the order of the first pattern each matches, then by name."""
    names = cell_names(model)
    order = {n: min(i for i, pat in enumerate(patterns) if fnmatch.fnmatch(n, pat))
             for n in names if any(fnmatch.fnmatch(n, pat) for pat in patterns)}
    return {n: names[n] for n in sorted(order, key=lambda n: (order[n], n))}


#: how far a re-pruned cell's perplexity may lie from the archived one for the archived measurements to carry over
CARRY_RTOL = 1e-3


def carried(archive: Path | None, name: str, version: str | None, model: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The archived cell's measurements and the note that says where they came from, or (None, {})."""
    old = archive / f"{name}.json" if archive is not None else None
    if old is None or not old.is_file():
        return None, {}
    return json.loads(old.read_text())["eval_info"], {
        "carried_from": f"{version}/results/{model}/{name}.json (perplexity, tasks)"}


def reproduces(bench: Bench, model: Any, archived: dict[str, Any], name: str) -> dict[str, Any]:
    """The carry check: ``model``'s perplexity at the protocol's longest window measured again against the archived
    cell's. Returns the record; ``record["ok"]`` says whether the archived measurements may stand for ``model``."""
    seq_len = max(bench.protocol.seq_lens)
    was = archived[f"ppl{seq_len}"]["ppl"]
    now = bench.perplexity(model, seq_len, f"{name} carry check ppl@{seq_len}")["ppl"]
    ok = abs(now - was) <= CARRY_RTOL * abs(was)
    if not ok:
        say(f"{name}: re-pruned ppl@{seq_len} {now:.4f} differs from the archived {was:.4f}: measured in full")
    return {"ok": ok, "seq_len": seq_len, "archived": was, "remeasured": now, "rtol": CARRY_RTOL}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=sorted(p.name for p in (HERE / "grid").iterdir() if p.is_dir()))
    ap.add_argument("--cells", nargs="*", default=["*"], help="glob patterns of cell names (default: all)")
    ap.add_argument("--carry-from", metavar="VERSION",
                    help="take perplexities and accuracies from this archived version's cells (same token sequences)")
    ap.add_argument("--results", type=Path, default=HERE / "results", metavar="DIR",
                    help="write the cells to DIR/<model>/ (default: the leaderboard's results/)")
    args = ap.parse_args(argv)
    proto = protocol()
    share_scores()
    cells = ordered_cells(args.model, args.cells)
    out = CellDir(args.results / args.model)
    todo = out.todo(cells)
    say(f"{args.model}: {len(cells)} cells selected, {len(cells) - len(todo)} already done, {len(todo)} to run")
    if not todo and out.done("dense"):
        return 0
    archive = HERE / args.carry_from / "results" / args.model if args.carry_from else None
    if archive is not None and not archive.is_dir():
        raise SystemExit(f"no archived cells at {archive}")
    c = proto["calibration"]
    calib = [f"collect.source={c['source']}", f"collect.n_tokens={c['n_tokens']}", f"collect.seq_len={c['seq_len']}",
             f"collect.seed={c['seed']}", f"collect.drop_first={c['drop_first']}", "collect.keep_activations=true"]
    bench = Bench(load_recipe(next(iter(cells.values())), calib), bench_protocol(proto))
    assert bench.base.calib is not None

    def meta(t0: float, started: dict[str, Any], recipe: Any, extra: dict[str, Any], **more: Any) -> dict[str, Any]:
        """What every cell records besides its results: ``started`` is the machine (and its load) at the cell's
        start, ``extra`` where carried measurements came from."""
        return {"protocol": proto, "machine": started, "command": bench.command,
                "calibration": {**feed_info(bench.base.calib.start), "sha256": bench.base.calib.sha256,
                                "tokens": bench.base.calib.n_tokens},
                **extra, "seconds": round(time.perf_counter() - t0, 1), **more,
                "provenance": bench.provenance(recipe)}

    def checked(model: Any, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The cell's measurements: the archived ones when they exist and ``model`` reproduces them (retention
        measured now, it is new in this version), else every part of the protocol measured now."""
        res, extra = carried(archive, name, args.carry_from, args.model)
        if res is not None:
            check = reproduces(bench, model, res, name)
            if check.pop("ok"):
                extra["carry_check"] = check
                if model is not bench.dense:
                    res["retention"] = bench.retention(model)
                return res, extra
            extra = {"carry_refused": {**check, "from": extra["carried_from"]}}
        return bench.evaluate(model, name), extra

    if not out.done("dense"):
        t0, started = time.perf_counter(), machine()
        res, extra = checked(bench.dense, "dense")
        res["params"] = count_params(bench.dense)
        out.write("dense", {"run_info": {"cell": "dense", "method": "dense", "sparsity": 0.0, "allocation": "-",
                                         "compensate": "none"},
                            "eval_info": res, "meta_info": meta(t0, started, bench.recipe, extra)})
    for name in todo:
        if out.done(name):  # written meanwhile by another run on the same folder (e.g. one per core, other cells)
            continue
        t0, started = time.perf_counter(), machine()
        say(f"cell {name}")
        recipe = load_recipe(cells[name], calib)
        r = bench.prune(recipe)
        res, extra = checked(r.lm.model, name)
        say(f"{name}: KL(dense||pruned) {res['retention']['kl']:.4f}, top-1 agreement "
            f"{res['retention']['top1_agreement']:.2%}")
        res["params"] = count_params(r.lm.model)
        p = recipe.prune
        assert r.plan is not None
        out.write(name, {
            "run_info": {"cell": name, "recipe": recipe.model_dump(mode="json"), "method": p.method,
                         "fbn_rule": p.fbn_rule if p.method == "fbn" else None,
                         "sparsity": r.plan.sparsity, "target_sparsity": p.sparsity, "allocation": p.allocation,
                         "compensate": p.compensate, "kept_widths": r.plan.kept_widths},
            "eval_info": res,
            "meta_info": meta(t0, started, recipe, extra, loadavg_at_end=os.getloadavg()),
        })
        del r
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
