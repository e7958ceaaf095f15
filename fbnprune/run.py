"""The pipeline, top to bottom: load -> collect -> discover -> score/plan -> prune -> evaluate -> export.

Each step is one small function calling into its stage package, so the pipeline reads as a list. Activations
(``collect``) and networks (``discover``) are cached by content, so re-running with another sparsity or method
reuses them. Outputs are built under a hidden temporary name and renamed at the end: a failed run leaves no
partial output directory.

Started as several processes (``torchrun`` / ``accelerate launch``, :mod:`fbnprune.distributed`), every rank runs
this same script: the stages share their batches, layers or windows out and combine the results, so every rank
holds the single-process values at each step. Rank 0 alone prints, fills shared caches and writes the outputs,
once every rank has finished.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbnprune import distributed as dist
from fbnprune.arch import MLPAdapter, get_adapter
from fbnprune.collect import ActivationStore, TokenBatch, collect, make_sequences
from fbnprune.collect.sources import DATA_FILES
from fbnprune.discover import DiscoverConfig, overview, run_discovery
from fbnprune.errors import UserError
from fbnprune.evaluate import next_token_agreement, perplexity
from fbnprune.evaluate.ppl import context_warnings, token_stream
from fbnprune.export.hf import atomic_dir, export_hf
from fbnprune.models import LoadedModel, load_model
from fbnprune.models.feed import feed_info
from fbnprune.outputs import check_output_dir
from fbnprune.paths import data_dir
from fbnprune.prune import KeepPlan, ScoreContext, apply_plan_, compensate_, make_plan, needs, score_neurons
from fbnprune.prune.plan import count_params, params_per_neuron
from fbnprune.prune.protect import auto_protected_layers
from fbnprune.recipe.load import dump_recipe
from fbnprune.recipe.schema import Recipe, recover_uses_networks

STAGES = ("collect", "discover", "prune", "evaluate", "export")


def say(msg: str) -> None:
    if dist.is_main():  # every rank runs the same steps: one copy of each line
        print(f"[fbnprune] {msg}", flush=True)


def needs_data(source: str) -> bool:
    return source in DATA_FILES


@dataclass
class Run:
    """What the stages hand to each other during one run."""

    recipe: Recipe
    lm: LoadedModel
    adapter: MLPAdapter
    have_data: bool
    report: dict[str, Any] = field(default_factory=lambda: {"notes": []})
    calib: TokenBatch | None = None
    store: ActivationStore | None = None
    networks: Any = None
    plan: KeepPlan | None = None
    dense: Any = None
    recover_text: Any = None  # training text of the recover stage, made right after loading (fails fast)
    held: TokenBatch | None = None  # held-out text of the retention metrics, made once

    def note(self, msg: str) -> None:
        say(msg)
        self.report["notes"].append(msg)


def provenance(recipe: Recipe, model_info: dict[str, Any]) -> dict[str, Any]:
    """Versions, seeds, machine and model/data identity for a results or export directory."""
    from fbnprune.provenance import machine, versions

    return {**versions(), "machine": machine(), "seed": recipe.seed, "model": model_info,
            "processes": dist.info(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def check_processes(recipe: Recipe) -> None:
    """What a multi-process run cannot do yet, refused before anything loads; and a cache all ranks share."""
    if not dist.active():
        return
    if recipe.recover is not None:
        raise UserError("recover (distillation) runs in one process: start this recipe without torchrun / "
                        "accelerate launch, or drop its recover section")
    from fbnprune.paths import cache_dir

    dist.check_shared_dir(dist.on_main(cache_dir, what="cache directory"))  # created by rank 0 only


# ------------------------------------------------------------------------------------------------ stages
def load(recipe: Recipe) -> Run:
    torch.manual_seed(recipe.seed)
    say(f"loading model {recipe.model.source!r} ({recipe.model.dtype})"
        + (f" in {dist.world()} processes" if dist.active() else ""))
    with dist.main_first("model load"):  # a converted model is cached by rank 0, then read by the others
        lm = load_model(recipe.model.source, dtype=recipe.model.dtype, device=dist.device_for(recipe.model.device))
    return Run(recipe=recipe, lm=lm, adapter=get_adapter(lm.model), have_data=data_dir() is not None)


def collect_stage(r: Run) -> None:
    c = r.recipe.collect
    if c is None:
        return
    source = c.source
    if needs_data(source) and not r.have_data:
        if not c.fallback:
            raise UserError(f"collect.source {source!r} needs the data directory, and collect.fallback is off")
        r.note(f"no data directory found: calibrating on {c.fallback!r} instead of {source!r} (data-free)")
        source = c.fallback
    # made once, on rank 0: every rank must calibrate on the same tokens (text sampled from the model included)
    r.calib = dist.on_main(lambda: make_sequences(r.lm.tokenizer, source, n_tokens=c.n_tokens, seq_len=c.seq_len,
                                                  mode=c.mode, seed=c.seed, model=r.lm.model),
                           what="calibration tokens")
    say(f"calibration: {r.calib.n_tokens} tokens from {r.calib.source} ({len(r.calib.sequences)} sequences"
        f"{', each starting with <bos>' if r.calib.start else ''})")
    r.report["calibration"] = {"source": r.calib.source, "tokens": r.calib.n_tokens, **feed_info(r.calib.start),
                               "sha256": r.calib.sha256}
    if r.recipe.prune.sequential and not recover_uses_networks(r.recipe):  # captured layer by layer instead
        return
    r.store = collect(r.lm.model, r.calib, model_info=r.lm.info, batch_size=c.batch_size,
                      keep_activations=c.keep_activations, drop_first=c.drop_first)
    r.report["calibration"].update(rows=r.store.n_rows, store=str(r.store.path))


def default_discover(r: Run) -> DiscoverConfig:
    """Discovery settings of a recipe without a discover section: the reference's blocks of 40 texts need
    document-mode calibration; packed calibration gets blocks of 2048 rows."""
    packed = r.recipe.collect is not None and r.recipe.collect.mode == "pack"
    return DiscoverConfig(block_texts=None, block_rows=2048) if packed else DiscoverConfig()


def discover_stage(r: Run) -> None:
    p = r.recipe.prune
    # sequential pruning finds its networks layer by layer, on the pruned model's activations
    prune_needs = needs(p.method, p.compensate, p.fbn_rule).networks and not p.sequential
    if not prune_needs and not recover_uses_networks(r.recipe):
        return
    if r.store is None:
        raise UserError("prune.method fbn needs a collect section")
    cfg = r.recipe.discover
    if cfg is None:
        cfg = default_discover(r)
        r.note(f"discover: default settings ({'blocks of 40 texts' if cfg.block_texts else 'blocks of 2048 tokens'})")
    r.networks = run_discovery(r.store, cfg)
    s = r.networks.summary
    say(f"networks: {s.get('runs_ok')} ICA run(s) ok, {s.get('runs_failed', 0)} failed -> {r.networks.path}")
    r.report["networks"] = {"path": str(r.networks.path), "runs_ok": s.get("runs_ok"),
                            "runs_failed": s.get("runs_failed"), "per_layer": overview.layer_rows(r.networks)}
    say("functional networks found: " + overview.describe(r.networks))
    if dist.is_main():
        print(overview.to_markdown(r.networks).split("\n", 2)[2], flush=True)


def write_networks(r: Run, out: Path) -> None:
    """The networks for a person: the per-layer table and the figure (when this run discovered networks)."""
    if r.networks is None:
        return
    (out / "networks.md").write_text(overview.to_markdown(r.networks))
    overview.figure(r.networks, out / "networks.png", r.lm.source)


def plan_stage(r: Run) -> KeepPlan:
    p = r.recipe.prune
    model = r.lm.model
    sparsity = p.sparsity
    if sparsity is None:  # obs needs the neuron fraction; derive it from the parameter budget
        total = sum(r.adapter.width(m) for m in r.adapter.mlps(model))
        sparsity = p.param_fraction * count_params(model) / params_per_neuron(model, r.adapter) / total
    ctx = ScoreContext(model=model, adapter=r.adapter, store=r.store,
                       sequences=r.calib.sequences if r.calib is not None else None, seed=p.seed, sparsity=sparsity,
                       ridge=p.ridge, gram_shrink=p.gram_shrink, fbn_rule=p.fbn_rule, networks=r.networks,
                       discover=r.recipe.discover)
    # sequential mode scores each layer only once the layers before it are pruned: plan the widths here
    # (protected layers, budget), the neurons in prune_stage
    scores = ([torch.zeros(r.adapter.width(m), dtype=torch.float64) for m in r.adapter.mlps(model)]
              if p.sequential else score_neurons(p.method, ctx))
    protected = p.protected_layers
    if protected == "auto" and r.calib is None:
        if "protected_layers" in p.model_fields_set:
            raise UserError("prune.protected_layers 'auto' needs calibration data (a collect section)")
        r.note("no calibration data: no protected layers (the default 'auto' measures them on calibration text)")
        protected = []
    auto = protected == "auto"
    if auto:
        assert r.calib is not None
        protected, evidence = auto_protected_layers(model, r.calib.sequences)
        r.report["protected_layers"] = evidence
        say(f"protected layers (auto, from calibration loss): {protected}")
    by_need = sorted(protected, key=lambda i: -r.report["protected_layers"]["delta"][i]) if auto else list(protected)

    def plan_with(prot: list[int]) -> KeepPlan:
        return make_plan(scores, sparsity=p.sparsity, param_fraction=p.param_fraction, model=model,
                         adapter=r.adapter, allocation=p.allocation, protected=prot, min_width=p.min_width,
                         round_to=p.round_to)

    while True:
        try:
            r.plan = plan_with(sorted(by_need))
            break
        except UserError:
            if not (auto and by_need):  # a budget the user's own protected list cannot meet stays an error
                raise
            dropped = by_need.pop()  # auto: give up protecting the least sensitive layer, then retry
            r.note(f"protected layers (auto): layer {dropped} released, the budget cannot be met with it whole")
            r.report["protected_layers"]["protected"] = sorted(by_need)
    r.plan.info["method"] = p.method
    # every rank computed the same plan from the same reduced statistics; rank 0's is the one all ranks prune by
    r.plan = dist.broadcast_object(r.plan, what="keep plan")
    return r.plan


def sequential_stage(r: Run) -> None:
    """Prune layer by layer (``prune.sequential``): the widths of ``r.plan``, the neurons chosen per layer."""
    from fbnprune.paths import cache_dir
    from fbnprune.prune.sequential import InMemoryLayers, SequentialOptions, prune_sequential, work_key

    assert r.plan is not None and r.calib is not None and r.recipe.collect is not None
    p, c = r.recipe.prune, r.recipe.collect
    opts = SequentialOptions(
        method=p.method, sparsity=r.plan.sparsity, compensate=p.compensate, refit_target=p.refit_target,
        ridge=p.ridge, gram_shrink=p.gram_shrink, fbn_rule=p.fbn_rule, discover=r.recipe.discover or default_discover(r),
        protected=tuple(r.plan.info["protected"]),
        min_width=p.min_width, round_to=p.round_to, mode=p.mode, seed=p.seed, batch_size=c.batch_size,
        drop_first=c.drop_first, kept_widths=tuple(r.plan.kept_widths))
    model_id = str(r.lm.info.get("sha256") or r.lm.info.get("source"))
    work = cache_dir() / "sequential" / work_key(model_id, r.calib.sha256, opts)
    if (work / "stream.pt").is_file():
        r.note(f"sequential: resuming an interrupted run from {work}" if not dist.active() else
               f"sequential: an interrupted one-process run left {work}; several processes start again instead")
    res = prune_sequential(InMemoryLayers(r.lm.model, r.adapter), r.calib.sequences, opts, work,
                           device=dist.device_for(r.recipe.model.device), doc_ids=r.calib.doc_ids)
    info = {**r.plan.info, **res.plan.info, "method": p.method}
    r.plan = res.plan
    r.plan.info = info
    r.report["sequential"] = res.report()


def prune_stage(r: Run) -> None:
    """Compensate (optional) and apply the plan in place; the dense copy stays for retention metrics."""
    assert r.plan is not None
    p = r.recipe.prune
    before = count_params(r.lm.model)
    if p.sequential:
        sequential_stage(r)
    else:
        comp = compensate_(r.lm.model, r.plan, r.store, p.compensate, networks=r.networks, ridge=p.ridge,
                           gram_shrink=p.gram_shrink, method=p.method, fbn_rule=p.fbn_rule)
        if comp:
            r.report["compensation"] = comp
        apply_plan_(r.lm.model, r.plan, mode=p.mode)
    after = count_params(r.lm.model)
    say(f"pruned {'layer by layer ' if p.sequential else ''}with {p.method!r}"
        f"{'' if p.compensate == 'none' else ' + ' + p.compensate}: "
        f"{r.plan.sparsity:.2%} of MLP neurons removed (widths {sorted(set(r.plan.kept_widths))}), "
        f"params {before:,} -> {after:,}")
    r.report.setdefault("results", {})["plan"] = {k: v for k, v in r.plan.to_json().items() if k != "keep"}


# ------------------------------------------------------------------------------------------------ recover
def recover_text_stage(r: Run) -> None:
    """The recover stage's training text, made right after loading: a bad source fails before anything costly."""
    from fbnprune.recover import training_text

    cfg = r.recipe.recover
    assert cfg is not None
    ev = r.recipe.evaluate
    r.recover_text = training_text(r.lm.tokenizer, cfg, model=r.lm.model,
                                   exclude=[pc.source for pc in ev.perplexity] if ev else [])
    info = r.recover_text.info()
    say(f"recovery text: {info['tokens']} tokens in {info['sequences']} windows of {info['seq_len']} from "
        + ", ".join(s["source"] for s in info["sources"]))


def recover_stage(r: Run, ppl_inputs: list[tuple[Any, torch.Tensor]], evaluating: bool) -> None:
    """Distil the dense model into the pruned one in place; perplexity and KL are measured before, for the report
    (after: the evaluate stage measures the recovered model as the pruned one)."""
    from fbnprune.recover import recover_
    from fbnprune.recover.report import spent

    cfg = r.recipe.recover
    assert cfg is not None
    before: dict[str, Any] = {}
    for pc, toks in ppl_inputs:
        out = perplexity(r.lm.model, toks, seq_len=pc.seq_len, batch_size=pc.batch_size,
                         desc="before recovery perplexity")
        before[f"ppl_{pc.source}_{pc.seq_len}"] = out
        say(f"before recovery perplexity ({pc.source}@{pc.seq_len}): {out['ppl']:.3f}")
    ev = r.recipe.evaluate
    if evaluating and ev is not None and ev.retention is not None:
        before["retention"] = agreement(r, r.lm.model)
        say(f"before recovery KL(dense||pruned) = {before['retention']['kl']:.4f} nats/token")
    record = recover_(r.dense, r.lm.model, r.lm.tokenizer, cfg, text=r.recover_text, plan=r.plan,
                      networks=r.networks)
    r.report["recovery"] = record
    r.report.setdefault("results", {})["recovery"] = {"before": before, "training": spent(record)}
    if record["resumed_from_step"] is not None:
        r.note(f"recovery resumed from the checkpoint of step {record['resumed_from_step']}")
    say(f"recovered ({cfg.method}): {record['steps']} steps, {record['tokens']:,} tokens in {record['minutes']:.2f} "
        f"min ({record['tokens_per_s']} tokens/s, stopped by {record['stop']}), loss {record['loss_start']} -> "
        f"{record['loss_end']}")


def _ppl_inputs(r: Run) -> list[tuple[Any, torch.Tensor]]:
    ev = r.recipe.evaluate
    out = []
    for pc in ev.perplexity if ev else []:
        if needs_data(pc.source) and not r.have_data:
            r.note(f"no data directory: skipping perplexity on {pc.source!r}")
            continue
        out.append((pc, token_stream(r.lm.tokenizer, pc.source, pc.max_tokens)))
    return out


def evaluate_model(r: Run, model: Any, label: str, ppl_inputs: list[tuple[Any, torch.Tensor]]) -> dict[str, Any]:
    ev = r.recipe.evaluate
    res: dict[str, Any] = {"params": count_params(model)}
    for pc, toks in ppl_inputs:
        out = perplexity(model, toks, seq_len=pc.seq_len, batch_size=pc.batch_size, desc=f"{label} perplexity")
        res[f"ppl_{pc.source}_{pc.seq_len}"] = out
        say(f"{label} perplexity ({pc.source}, {out['windows']} windows x {pc.seq_len} tokens"
            f"{', each after <bos>' if out['bos'] else ''}): {out['ppl']:.3f}")
    if label == "dense":
        by_source: dict[str, dict[int, float]] = {}
        for pc, _ in ppl_inputs:
            by_source.setdefault(pc.source, {})[pc.seq_len] = res[f"ppl_{pc.source}_{pc.seq_len}"]["ppl"]
        for warning in context_warnings(by_source):
            r.note(f"warning: {warning}")
    if ev is not None and ev.tasks:
        from fbnprune.evaluate.harness import evaluate_tasks

        res["tasks"] = evaluate_tasks(model, r.lm.tokenizer, ev.tasks, limit=ev.limit, batch_size=ev.batch_size,
                                      blimp_per_paradigm=ev.blimp_per_paradigm, engine=ev.engine,
                                      subset=ev.subset, subset_seed=ev.subset_seed)
    if ev is not None:
        from fbnprune.evaluate.speed import model_stats

        # size only: speed is measured in run() for both models together, once the pruned one exists
        res["stats"] = model_stats(model, r.lm.tokenizer, speed=False)
    return res


def retention_report_stage(r: Run, ppl_inputs: list[tuple[Any, torch.Tensor]]) -> None:
    """Dense vs pruned, per task and perplexity, with ratios; written as JSON and Markdown, printed at the end."""
    from fbnprune.evaluate.report import retention_report

    res = r.report["results"]
    d, p = res["dense"], res["pruned"]
    lab = {f"ppl_{pc.source}_{pc.seq_len}": f"{pc.source}@{pc.seq_len}" for pc, _ in ppl_inputs}
    r.report["retention"] = retention_report(
        d.get("tasks") or {"tasks": {}}, p.get("tasks") or {"tasks": {}}, d.get("stats"), p.get("stats"),
        dense_ppl={v: d[k] for k, v in lab.items()}, pruned_ppl={v: p[k] for k, v in lab.items()},
        agreement=p.get("retention"),
    )
    if "recovery" in res:
        from fbnprune.recover.report import before_after_rows

        res["recovery"]["rows"] = before_after_rows(res, lab)
        r.report["retention"]["recovery"] = res["recovery"]


def retention_markdown(report: dict[str, Any]) -> str:
    """The retention report as Markdown, with the before / after recovery table when the run recovered."""
    from fbnprune.evaluate.report import to_markdown

    text = to_markdown(report["retention"])
    rec = report["retention"].get("recovery")
    if rec:
        from fbnprune.recover.report import to_markdown as recovery_markdown

        text += "\n" + recovery_markdown(rec["rows"], rec["training"]) + "\n"
    return text


def held_out(r: Run) -> TokenBatch:
    """The retention metrics' held-out text (sampled from the dense model for ``self``), made once per run."""
    if r.held is None:
        rc = r.recipe.evaluate.retention
        src = rc.source if (r.have_data or not needs_data(rc.source)) else "self"
        r.held = dist.on_main(lambda: make_sequences(r.lm.tokenizer, src, n_tokens=rc.n_tokens, seq_len=rc.seq_len,
                                                     seed=rc.seed, model=r.dense), what="held-out text")
    return r.held


def agreement(r: Run, model: Any) -> dict[str, Any]:
    """KL(dense || model) and top-1 agreement on the held-out text."""
    held = held_out(r)
    out = next_token_agreement(r.dense, model, held.sequences)
    out["source"] = held.source
    out.update(feed_info(held.start))
    return out


def retention_stage(r: Run) -> None:
    ev = r.recipe.evaluate
    if ev is None or ev.retention is None or r.dense is None:
        return
    out = agreement(r, r.lm.model)
    held = held_out(r)
    r.report["results"]["pruned"]["retention"] = out
    say(f"data-free retention on {held.n_tokens} held-out tokens from {held.source}: "
        f"KL(dense||pruned) = {out['kl']:.4f} nats/token, top-1 agreement = {out['top1_agreement']:.2%}")


def write_outputs(r: Run, out: Path, stages: set[str]) -> None:
    recipe = r.recipe
    export = recipe.export is not None and recipe.export.enabled and "export" in stages
    if export and recipe.prune.mode != "slice":
        r.note("prune.mode is 'mask': no compressed checkpoint is exported (masks save nothing)")
        export = False

    def write(tmp: Path) -> None:
        (tmp / "recipe.yaml").write_text(dump_recipe(recipe))
        if r.plan is not None:
            r.plan.save(tmp / "keep_plan.json")
        (tmp / "report.json").write_text(json.dumps(r.report, indent=2, default=str))
        write_networks(r, tmp)
        if "retention" in r.report:
            (tmp / "retention.md").write_text(retention_markdown(r.report))
        if r.report.get("recovery", {}).get("curve"):
            from fbnprune.recover import loss_figure

            loss_figure(r.report["recovery"], tmp / "recovery_loss.png", f"{recipe.name}: recovery loss")
        if export:
            from fbnprune.export.card import networks_from_set

            assert recipe.export is not None and r.plan is not None
            export_hf(r.lm.model, r.lm.tokenizer, tmp / recipe.export.subdir, plan=r.plan, report=r.report,
                      recipe_text=dump_recipe(recipe), require_stock=recipe.export.require_stock,
                      gguf=recipe.export.gguf,
                      networks=networks_from_set(r.networks) if r.networks is not None else None,
                      extra_json={"fbnprune_keep_plan.json": r.plan.to_json()})

    atomic_dir(out, write)
    if "retention" in r.report:
        print(retention_markdown(r.report), flush=True)
    layout = ""
    if export:
        from fbnprune.export.hf import read_manifest

        assert recipe.export is not None
        loader = (read_manifest(out / recipe.export.subdir) or {}).get("loader")
        layout = f", {recipe.export.subdir}/ checkpoint ({'stock transformers' if loader == 'stock' else 'fbnprune.load_pretrained'} loads it)"
    say(f"wrote {out}/ (report.json, keep_plan.json, recipe.yaml{layout}) in {r.report['seconds']} s")
    if export and recipe.export is not None and recipe.export.push_to_hub:
        from fbnprune.export import push_to_hub

        say(f"pushed: {push_to_hub(out / recipe.export.subdir, recipe.export.push_to_hub, private=recipe.export.private)}")


def run(
    recipe: Recipe, output_dir: str | Path | None = None, until: str = "export", evaluate: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``recipe`` up to and including stage ``until``; returns the report (also written as report.json).

    ``until="collect"`` or ``"discover"`` only fill the caches (nothing is written to the output directory);
    ``"prune"`` writes the keep plan; ``"evaluate"`` adds the evaluation; ``"export"`` (default) does everything
    (``evaluate=False`` skips the evaluation, for a quick export). The output directory is checked before the
    model loads (:func:`fbnprune.outputs.check_output_dir`): an earlier run's output there is replaced only with
    ``overwrite``, so a second run cannot silently discard the first one's results.
    """
    if until not in STAGES:
        raise UserError(f"unknown stage {until!r}; choose one of {', '.join(STAGES)}")
    check_processes(recipe)
    stages = set(STAGES[: STAGES.index(until) + 1])
    if not evaluate:
        stages.discard("evaluate")
    recovering = recipe.recover is not None and until in ("evaluate", "export")  # the model an export would ship
    t0 = time.perf_counter()
    out = Path(output_dir or recipe.output_dir or f"outputs/{recipe.name}")
    if until not in ("collect", "discover"):
        dist.on_main(lambda: check_output_dir(out, overwrite=overwrite), what="output directory check")
    r = load(recipe)
    r.report["recipe"] = recipe.name
    if dist.active():
        r.report["distributed"] = dist.info()
    if recovering:
        recover_text_stage(r)
    collect_stage(r)
    discover_stage(r)
    if until in ("collect", "discover"):
        r.report["seconds"] = round(time.perf_counter() - t0, 1)
        return r.report
    plan_stage(r)
    evaluating = "evaluate" in stages and recipe.evaluate is not None
    ppl_inputs = _ppl_inputs(r) if evaluating else []
    results = r.report.setdefault("results", {})
    if evaluating:
        results["dense"] = evaluate_model(r, r.lm.model, "dense", ppl_inputs)
    if recovering or (evaluating and (recipe.evaluate.retention is not None or recipe.evaluate.speed)):
        r.dense = copy.deepcopy(r.lm.model)  # the teacher of recovery and the reference of KL and speed
    if "prune" in stages:
        prune_stage(r)
    if recovering:
        recover_stage(r, ppl_inputs, evaluating)
    if evaluating:
        results["pruned"] = evaluate_model(r, r.lm.model, "recovered" if recovering else "pruned", ppl_inputs)
        retention_stage(r)
        if recipe.evaluate.speed:  # dense and pruned timed in alternation, so that a change of load hits both
            from fbnprune.evaluate.speed import paired_generation_speed

            # one timing, on rank 0 (several processes timing at once would measure each other)
            timed = dist.on_main(lambda: paired_generation_speed(r.dense, r.lm.model, r.lm.tokenizer),
                                 what="generation speed")
            for label in ("dense", "pruned"):
                results[label]["stats"]["generation"] = timed[label]
            d, p, vs = timed["dense"], timed["pruned"], timed["pruned"]["vs_dense"]
            say(f"generation tokens/s, dense vs pruned in alternation: {d['tokens_per_s']} vs {p['tokens_per_s']} "
                f"(per CPU-second {d['tokens_per_cpu_s']} vs {p['tokens_per_cpu_s']})"
                + ("" if vs["busy"] else f", pruned / dense {vs['speedup']:.3f}"))
            if vs["busy"]:
                r.note(f"warning: generation speed: {vs['warning']}; the pruned / dense speed ratio is not a result")
        retention_report_stage(r, ppl_inputs)
    r.dense = None
    r.report["provenance"] = provenance(recipe, r.lm.info)
    r.report["seconds"] = round(time.perf_counter() - t0, 1)
    dist.barrier("before writing outputs")  # every rank finished: nothing is written for a run that failed
    if dist.is_main():
        write_outputs(r, out, stages)
    dist.barrier("outputs written")  # the other ranks end with rank 0 (and fail if its writing failed)
    return r.report
