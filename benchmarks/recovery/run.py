"""Recovery benchmark (issue 22): the best training-free pruning, then distillation from the dense model, with
perplexity, KL and tasks before and after.

Protocol: the leaderboard's (``benchmarks/leaderboard/protocol.yaml``) calibration, perplexity text and tasks;
pruning by OBS + re-fit, uniform widths, nothing protected (the leaderboard's best training-free cell). KL and
top-1 agreement are measured on held-out text that is neither recovery text nor evaluation text (``--held-out``,
default ``wiki``: the recovery text defaults to c4, the leaderboard's held-out source). Every recovery starts from
a fresh copy of the same pruned model; "before" is measured once per model and sparsity.

Budgets are minutes of training on this machine. A time budget gets fewer tokens when anything else runs, so
``--tokens-per-minute MODEL=RATE`` turns each budget into the tokens that many minutes process on a quiet machine
(``max_tokens = RATE x minutes``; the rate is read off a quiet time-budget cell's ``training.tokens_per_s``), which
makes a cell's result independent of the load and the benchmark safe to run beside other jobs; rows record which
budget was used (``budget_tokens`` and the rate behind it, ``budget_tokens_per_minute``; both None for wall time).

The network-loss ablation (``--network-weights 0,1``): besides the logits, the student is distilled towards the
activity of the dense model's functional networks (mean activation of each network's kept members; networks
discovered on the calibration activations with the pipeline's default discovery); at the same token budget as the
logits-only cell, so the comparison is of the losses and not of the tokens they got.

Cells: model x sparsity x data x budget x recovery method x network weight, one JSON each under
``results/<model>/`` (a rerun skips finished cells; a cell interrupted during training resumes from its
checkpoint); ``results.json`` is the list of rows the issue asks for and ``results.md`` their table, both rebuilt
after every cell.

    nice -n 10 .venv/bin/python benchmarks/recovery/run.py --models smollm2-135m --sparsities 0.3,0.5 \
        --budgets 5,15,30 --data c4+technical,self --methods full
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import Bench, CellDir, Protocol, read_json, record, write_json  # noqa: E402
from fbnprune.recipe import Recipe  # noqa: E402
from fbnprune.recover import RecoverConfig, recover_  # noqa: E402
from fbnprune.recover.report import spent  # noqa: E402

LEADERBOARD = yaml.safe_load((HERE.parent / "leaderboard" / "protocol.yaml").read_text())
PRUNE = {"method": "obs", "compensate": "refit", "allocation": "uniform", "protected_layers": [], "mode": "slice"}


def bench_recipe(model: str, networks: bool = False) -> Recipe:
    """The benchmark's recipe; ``networks`` adds a recover section with the network loss on, which makes the
    pipeline discover the dense model's networks (OBS itself needs none; its pruned model is the same)."""
    c = LEADERBOARD["calibration"]
    return Recipe.model_validate({
        "name": f"recovery-{Path(model).name}", "model": {"source": model, "dtype": "float32"},
        "collect": {**c, "keep_activations": True, "fallback": None}, "prune": PRUNE,
        "recover": {"network_weight": 1.0} if networks else None, "evaluate": None, "export": None})


def protocol(args: argparse.Namespace) -> Protocol:
    pp, sub = LEADERBOARD["perplexity"], LEADERBOARD["task_subset"]
    tasks = tuple(t for t in args.tasks.split(",") if t)
    return Protocol(seq_lens=tuple(int(s) for s in args.seq_lens.split(",")), ppl_source=pp["source"],
                    ppl_tokens=pp["max_tokens"], tasks=tasks,
                    task_options={"batch_size": LEADERBOARD["batch_size"], "subset": sub["items"],
                                  "subset_seed": sub["seed"]},
                    retention={**LEADERBOARD["retention"], "source": args.held_out}, progress=False)


def summary(ev: dict[str, Any]) -> dict[str, Any]:
    """Perplexities, KL, top-1 and the tasks' mean primary metric of one evaluation, and whether its windows
    started with a BOS token (the model's feed)."""
    from fbnprune.evaluate.report import primary_metric

    out: dict[str, Any] = {k: v["ppl"] for k, v in ev.items() if k.startswith("ppl")}
    out["bos"] = next((v["bos"] for k, v in ev.items() if k.startswith("ppl") and "bos" in v), None)
    if "retention" in ev:
        out["kl"], out["top1"] = ev["retention"]["kl"], ev["retention"]["top1_agreement"]
    tasks = (ev.get("tasks") or {}).get("tasks") or {}
    if tasks:
        accs = {t: m.get(primary_metric(t, m)) for t, m in tasks.items()}
        out["tasks"] = accs
        out["tasks_mean"] = sum(accs.values()) / len(accs)
    return out


DEFAULTS = {k: RecoverConfig.model_fields[k].default
            for k in ("grad_accum", "precision", "warmup_steps", "lm_weight", "mlp_weight")}


def rows(out: Path) -> list[dict[str, Any]]:
    """The issue's rows from every finished cell."""
    found = []
    for path in sorted(out.glob("results/*/*.json")):
        cell = read_json(path)
        if cell and "recovery" in cell:
            # settings the table shows, from the cell's own settings for rows written before the row held them
            found.append({**{k: cell.get("settings", {}).get(k, DEFAULTS[k]) for k in DEFAULTS}, **cell["row"]})
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--budgets", default="5,15,30", help="minutes of training per cell")
    ap.add_argument("--data", default="c4+technical,self", help="comma-separated; '+' joins sources of one cell")
    ap.add_argument("--methods", default="full", help="recovery methods: full, lora")
    ap.add_argument("--self-tokens", type=int, default=65536,
                    help="text sampled from the dense model for 'self' (the other sources of a cell: all their text)")
    ap.add_argument("--held-out", default="wiki", help="held-out text of KL (never recovery text)")
    ap.add_argument("--seq-lens", default="2048", help="perplexity window lengths")
    ap.add_argument("--tasks", default=",".join(LEADERBOARD["tasks"]), help="lm-eval tasks ('' for none)")
    ap.add_argument("--tokens-per-minute", default="", metavar="MODEL=RATE,...",
                    help="budget each model's cells in tokens (RATE x minutes, input tokens) instead of wall time")
    ap.add_argument("--network-weights", default="0",
                    help="comma-separated weights of the network-activity loss (0: logits only)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recovery setting other than its default (e.g. seq_len=2048, lr=3e-4; YAML values); "
                    "cells with such settings are named apart")
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--tables-only", action="store_true",
                    help="rebuild results.json and results.md from the finished cells; train nothing")
    args = ap.parse_args()
    out = Path(args.out)
    if args.tables_only:
        write_tables(out)
        return
    rates = parse_rates(args.tokens_per_minute)
    weights = parse_weights(args.network_weights)
    extra = parse_settings(args.set)
    rec = record()
    proto = protocol(args)
    long = max(proto.seq_lens)
    for model in args.models.split(","):
        cells = CellDir(out / "results" / Path(model).name)
        bench = Bench(bench_recipe(model, networks=any(w > 0 for w in weights)), proto, command=rec["command"])
        rate = rates.get(Path(model).name)
        dense = cells.read("dense")
        if dense is None:
            dense = {"eval": summary(bench.evaluate(bench.dense, "dense")), **record(rec["command"])}
            cells.write("dense", dense)
        for sp in (float(s) for s in args.sparsities.split(",")):
            todo = [(data, minutes, method, nw) for data in args.data.split(",")
                    for minutes in (float(b) for b in args.budgets.split(",")) for method in args.methods.split(",")
                    for nw in weights
                    if not cells.done(cell_name(sp, data, minutes, method, rate, nw, extra, args.self_tokens))]
            if not todo:
                continue
            pruned = bench.prune(bench.recipe_with(sparsity=sp))
            before = cells.read(f"before-{sp}")
            if before is None:
                before = {"eval": summary(bench.evaluate(pruned.lm.model, f"pruned {sp}")),
                          "plan": {k: v for k, v in pruned.plan.to_json().items() if k != "keep"},
                          **record(rec["command"])}
                cells.write(f"before-{sp}", before)
            for data, minutes, method, nw in todo:
                sources = data.split("+")
                if args.held_out in sources:
                    raise SystemExit(f"--held-out {args.held_out!r} is recovery text in --data {data!r}")
                name = cell_name(sp, data, minutes, method, rate, nw, extra, args.self_tokens)
                budget = {"max_minutes": minutes} if rate is None else {"max_tokens": max(1, round(rate * minutes))}
                cfg = RecoverConfig(method=method, data=sources, **budget,
                                    n_tokens=self_tokens(sources, args.self_tokens),
                                    checkpoint_every=args.checkpoint_every, network_weight=nw, **extra)
                student = copy.deepcopy(pruned.lm.model)
                trained = recover_(bench.dense, student, bench.tokenizer, cfg, plan=pruned.plan,
                                   networks=pruned.networks)  # a progress bar: a cell trains for up to an hour
                after = summary(bench.evaluate(student, name))
                cells.write(name, {"row": row(model, sp, data, minutes, rate, cfg, dense["eval"], before["eval"], after,
                                              trained, rec, long),
                                   "after": after, "recovery": trained, "settings": cfg.model_dump(mode="json"),
                                   **record(rec["command"])})
                write_tables(out)


def write_tables(out: Path) -> None:
    """results.json and results.md from every finished cell under ``out``."""
    found = rows(out)
    write_json(out / "results.json", found, indent=1)
    (out / "results.md").write_text(markdown(found))


def self_tokens(sources: list[str], n: int) -> int | dict[str, int] | None:
    """``n_tokens`` of a cell: ``n`` sampled tokens for ``self``, every window of the other sources."""
    if "self" not in sources:
        return None
    return n if sources == ["self"] else {"self": n}


def parse_rates(text: str) -> dict[str, float]:
    """``MODEL=RATE,...`` (tokens per minute of training on a quiet machine) as a dict; a clear error otherwise."""
    rates: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, sep, value = item.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = float("nan")
        if not sep or not name or not rate > 0:
            raise SystemExit(f"--tokens-per-minute: expected MODEL=RATE with RATE > 0, got {item!r}")
        rates[Path(name).name] = rate
    return rates


def markdown(found: list[dict[str, Any]]) -> str:
    """The rows as one table: before / after for ppl@2048, KL to dense and the tasks' mean, and what was spent."""
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    key = next((k for r in found for k in r if k.startswith("dense_ppl")), "dense_ppl2048").removeprefix("dense_")
    lines = ["# Recovery by distillation (generated by run.py)", "",
             f"Gap closed: `(before - after) / (before - dense)` of {key}. KL to the dense model on held-out text; "
             "tasks: mean primary metric of the leaderboard's task subsets.", "",
             f"| model | sparsity | data | budget | recovery | net loss | dense {key} | before | after | gap closed "
             "| KL before -> after | tasks before -> after (dense) | tokens | wall min |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|"]
    # windows x batch, learning rate and trained modules; rows written before these were recorded used the defaults
    def how(r: dict[str, Any]) -> str:
        mods = ",".join(r.get("target_modules") or r["training"]["target_modules"] or [])
        seq_len = r.get("seq_len", RecoverConfig.model_fields["seq_len"].default)
        batch = r.get("batch_size", RecoverConfig.model_fields["batch_size"].default)
        more = "".join([f" x{r['grad_accum']} accum" if r.get("grad_accum", 1) != 1 else "",
                        f", {r['precision']}" if r.get("precision", "float32") != "float32" else "",
                        f", warm-up {r['warmup_steps']} steps" if r.get("warmup_steps") else "",
                        f", LM loss x{r['lm_weight']:g}" if r.get("lm_weight") else "",
                        f", MLP loss x{r['mlp_weight']:g}" if r.get("mlp_weight") else ""])
        return f"{r['recovery']} {mods}, {seq_len}x{batch}{more}, lr {r['lr']:g}"

    def data(r: dict[str, Any]) -> str:  # the sources, and how much text was sampled for ``self``
        return r["data"] + (f" ({r['self_tokens']:,} self tokens)" if r.get("self_tokens") else "")

    for r in sorted(found, key=lambda r: (r["model"], r["sparsity"], data(r), r["budget_min"], how(r),
                                          r.get("network_weight") or 0.0)):
        t = r["training"]
        budget = f"{r['budget_min']:g} min" + (f" ({r['budget_tokens']:,} tokens)" if r["budget_tokens"] else "")
        lines.append(
            f"| {r['model']} | {r['sparsity']:g} | {data(r)} | {budget} | {how(r)} | "
            f"{f(r.get('network_weight') or 0.0, 'g')} | {r[f'dense_{key}']:.2f} | {r[f'{key}_before']:.2f} | "
            f"{r[f'{key}_after']:.2f} | {f(r['gap_closed'], '.1%')} | "
            f"{f(r['kl_before'], '.3f')} -> {f(r['kl_after'], '.3f')} | {f(r['tasks_mean_before'], '.3f')} -> "
            f"{f(r['tasks_mean_after'], '.3f')} ({f(r['tasks_mean_dense'], '.3f')}) | {t['tokens']:,} | "
            f"{t['minutes']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_weights(text: str) -> list[float]:
    """``--network-weights`` as a list of non-negative floats; a clear error otherwise."""
    try:
        weights = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        weights = [-1.0]
    if not weights or not all(w >= 0 for w in weights):
        raise SystemExit(f"--network-weights: expected comma-separated weights >= 0, got {text!r}")
    return weights


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as recovery settings, checked against :class:`RecoverConfig` (a clear error for an
    unknown key, a bad value, or a setting the benchmark itself sets per cell)."""
    own = {"method", "data", "max_minutes", "max_tokens", "n_tokens", "checkpoint_every", "network_weight"}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in RecoverConfig.model_fields or key in own:
            raise SystemExit(f"--set: expected KEY=VALUE with KEY a recovery setting the benchmark does not set per "
                             f"cell ({', '.join(sorted(set(RecoverConfig.model_fields) - own))}), got {item!r}")
        out[key] = yaml.safe_load(value)
    try:
        cfg = RecoverConfig(**out)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    return {k: getattr(cfg, k) for k in out}  # validated values ("3e-4" read as YAML is a string)


def cell_name(sp: float, data: str, minutes: float, method: str, rate: float | None = None,
              network_weight: float = 0.0, extra: dict[str, Any] | None = None, self_tokens: int = 0) -> str:
    """A cell's file name; a token budget (``rate``) is another cell than the same minutes of wall time, and a
    network loss, another amount of sampled text (``self_tokens``, named when ``data`` holds ``self``) or other
    settings (``extra``) another cell than the defaults."""
    budget = f"{minutes:g}min" if rate is None else f"{minutes:g}min-{round(rate * minutes)}tok"
    net = f"__net{network_weight:g}" if network_weight > 0 else ""
    sampled = f"__self_tokens={self_tokens}" if "self" in data.split("+") else ""
    more = "".join(f"__{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted((extra or {}).items()))
    return f"{PRUNE['method']}-refit-{sp}__{data}__{budget}__{method}{net}{sampled}{more}"


def row(model: str, sp: float, data: str, minutes: float, rate: float | None, cfg: RecoverConfig, d: dict[str, Any],
        b: dict[str, Any], a: dict[str, Any], trained: dict[str, Any], rec: dict[str, Any],
        long: int) -> dict[str, Any]:
    """One row of results.json: the issue's fields, the gap closed, and what the recovery spent."""
    key = f"ppl{long}"
    gap = b[key] - d[key]
    return {"model": Path(model).name, "method": "obs+refit", "sparsity": sp, "data": data, "budget_min": minutes,
            "recovery": cfg.method, "lr": cfg.lr, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "precision": cfg.precision, "warmup_steps": cfg.warmup_steps,
            "lm_weight": cfg.lm_weight, "mlp_weight": cfg.mlp_weight, "target_modules": cfg.target_modules,
            f"dense_ppl{long}": d[key], f"ppl{long}_before": b[key],
            f"ppl{long}_after": a[key], "gap_closed": (b[key] - a[key]) / gap if gap else None,
            "kl_before": b.get("kl"), "kl_after": a.get("kl"), "top1_before": b.get("top1"),
            "top1_after": a.get("top1"), "tasks_mean_dense": d.get("tasks_mean"),
            "tasks_mean_before": b.get("tasks_mean"), "tasks_mean_after": a.get("tasks_mean"),
            "network_weight": cfg.network_weight, "bos": a.get("bos"), "budget_tokens": cfg.max_tokens,
            "self_tokens": cfg.tokens_of("self") if "self" in cfg.data else None,
            "budget_tokens_per_minute": rate,
            "training": spent(trained), "command": rec["command"], "machine": rec["machine"]}


if __name__ == "__main__":
    main()
