"""Analysis experiments: hook-based masking equals weight masking, hooks never leak, controls match in size."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from fbnprune.analyze import neuron_gains, ranked_networks, recurrence_analysis, top_networks
from fbnprune.analyze.experiments import (
    fraction,
    intervention_plan,
    random_like,
    run_interventions,
    summarize,
)
from fbnprune.analyze.report import verdicts
from fbnprune.arch import get_adapter
from fbnprune.discover.networks import NetworkSet, network_recurrence, pack_bits
from fbnprune.errors import UserError
from tests.conftest import ALL_TYPES, make_tiny_env, tiny_model


def _hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_zeroing_by_hook_equals_zeroing_the_weights(model_type, tokens):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    drop = {layer: torch.rand(128, generator=g) < 0.3 for layer in range(2)}
    masked = copy.deepcopy(model)
    for layer, mlp in enumerate(adapter.mlps(masked)):
        adapter.mask_(mlp, torch.nonzero(~drop[layer]).flatten())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(tokens).logits
        with neuron_gains(model, adapter, {layer: (~m).float() for layer, m in drop.items()}):
            hooked = model(tokens).logits
        after = model(tokens).logits
        ref = masked(tokens).logits
    assert (hooked - ref).abs().max() < 1e-5
    assert (hooked - plain).abs().max() > 1e-3  # the mask does something
    assert torch.equal(after, plain)  # hooks removed
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    assert _hooks(model) == 0


def test_gain_equals_scaled_down_projection(tiny_llama, tokens):
    adapter = get_adapter(tiny_llama)
    gain = torch.ones(128)
    gain[:10] = 3.0
    scaled = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        adapter.down_module(adapter.mlps(scaled)[1]).weight[:, :10] *= 3.0
        with neuron_gains(tiny_llama, adapter, {1: gain}):
            hooked = tiny_llama(tokens).logits
        assert (hooked - scaled(tokens).logits).abs().max() < 1e-5


def test_hooks_are_removed_on_error_and_bad_input_is_refused(tiny_llama, tokens):
    adapter = get_adapter(tiny_llama)
    with pytest.raises(RuntimeError, match="boom"), neuron_gains(tiny_llama, adapter, {0: torch.zeros(128)}):
        assert _hooks(tiny_llama) == 1
        raise RuntimeError("boom")
    assert _hooks(tiny_llama) == 0
    with pytest.raises(UserError, match="expected \\(128,\\)"), neuron_gains(tiny_llama, adapter, {0: torch.ones(5)}):
        pass
    with pytest.raises(UserError, match="layer 7 does not exist"), neuron_gains(tiny_llama, adapter, {7: torch.ones(128)}):
        pass
    assert _hooks(tiny_llama) == 0


# ------------------------------------------------------------------------------------------------ synthetic networks
def fake_networks(tmp_path: Path, runs: list[list[list[int]]], n: int = 64, layers: int = 2,
                  match_threshold: float = 0.3) -> NetworkSet:
    """A NetworkSet whose every layer has the given networks per run (lists of neuron indices)."""
    tensors = {}
    width = max(len(r) for r in runs)
    runs = [r + [[]] * (width - len(r)) for r in runs]  # every run stores as many networks (empty ones pad)
    for layer in range(layers):
        members = []
        for nets in runs:
            m = torch.zeros(len(nets), n, dtype=torch.bool)
            for i, idx in enumerate(nets):
                m[i, idx] = True
            members.append(m)
        tensors[f"net_members.{layer}"] = pack_bits(torch.stack(members))
        tensors[f"net_recurrence.{layer}"] = network_recurrence(members, match_threshold)
    summary = {"layers": layers, "widths": [n] * layers, "matched_runs": len(runs),
               "params": {"threshold": 3.6, "match_threshold": match_threshold}}
    return NetworkSet(tmp_path, tensors, summary)


def test_ranking_puts_recurring_networks_first_and_unions_them(tmp_path):
    # run 0: network A (recurs in both other runs), B (recurs in one), C (never), D empty
    a, b, c = list(range(0, 8)), list(range(10, 14)), list(range(20, 40))
    nets = fake_networks(tmp_path, [[c, b, a, []], [a, b, [50, 51]], [a, [60, 61], [62]]])
    ranked = ranked_networks(nets, 0, run=0)
    assert ranked.shape[0] == 3  # the empty network is dropped
    assert torch.equal(torch.nonzero(ranked[0]).flatten(), torch.tensor(a))
    assert torch.equal(torch.nonzero(ranked[1]).flatten(), torch.tensor(b))
    top2 = top_networks(nets, 2)
    assert set(torch.nonzero(top2[1]).flatten().tolist()) == set(a) | set(b)
    assert int(top_networks(nets, 99)[0].sum()) == len(a) + len(b) + len(c)
    rnd = random_like(top2, seed=3)
    assert [int(m.sum()) for m in rnd.values()] == [12, 12]
    assert not torch.equal(rnd[0], top2[0])
    assert torch.equal(rnd[0], random_like(top2, seed=3)[0])
    assert fraction(top2) == pytest.approx(12 / 64)


def test_recurrence_is_perfect_for_identical_runs_and_low_for_chance(tmp_path):
    g = torch.Generator().manual_seed(0)
    nets_run = [torch.randperm(64, generator=g)[:6].tolist() for _ in range(5)]
    rec = recurrence_analysis(fake_networks(tmp_path, [nets_run, nets_run, nets_run]), shuffles=10)
    assert rec["observed_median"] == 1.0 and rec["observed_match_rate"] == 1.0
    assert rec["chance_median"] < 0.3 and rec["chance_match_rate"] < 0.2
    assert len(rec["observed"]) == 2 * 3 * 5  # layers x run pairs x networks
    assert sum(rec["chance_hist"]) == rec["chance_n"] == 10 * len(rec["observed"])
    with pytest.raises(UserError, match="at least two discovery runs"):
        recurrence_analysis(fake_networks(tmp_path, [nets_run]))


def test_intervention_plan_controls_touch_as_many_neurons(tmp_path):
    a, b = list(range(0, 8)), list(range(10, 30))
    nets = fake_networks(tmp_path, [[a, b], [a, b]])
    plan = intervention_plan(nets, mask_top=[1, 2], keep_top=[1], amplify_top=1, gains=[2.0], random_seeds=2)
    assert [p["experiment"] for p in plan].count("mask") == 2 * 3
    for p in plan[1:]:
        zeros = sum(int((g == 0).sum()) for g in p["gains"].values())
        scaled = sum(int((g == 2.0).sum()) for g in p["gains"].values())
        if p["experiment"] == "mask":
            assert zeros == round(p["fraction"] * 128)
        elif p["experiment"] == "keep":
            assert zeros == 128 - round(p["fraction"] * 128)
        else:
            assert scaled == round(p["fraction"] * 128)
    net_frac = {(p["experiment"], p["x"]): p["fraction"] for p in plan if p["kind"] == "network"}
    assert all(p["fraction"] == net_frac[(p["experiment"], p["x"])] for p in plan if p["kind"] == "random")


def test_interventions_and_summary_on_a_tiny_model(tmp_path, tiny_llama, tokens):
    adapter = get_adapter(tiny_llama)
    a, b = list(range(0, 32)), list(range(40, 60))
    nets = fake_networks(tmp_path, [[a, b], [a, b]], n=128)

    def probe():
        with torch.no_grad():
            logits = tiny_llama(tokens).logits
        return {"ppl": float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256),
                                                                tokens[:, 1:].reshape(-1)).exp())}

    plan = intervention_plan(nets, mask_top=[1], keep_top=[2], amplify_top=1, gains=[1.0], random_seeds=2)
    rows = run_interventions(tiny_llama, adapter, probe, plan, progress=False, cache=tmp_path / "c", cache_salt="m")
    assert len(list((tmp_path / "c").glob("*.json"))) == len(plan)
    calls = []
    again = run_interventions(tiny_llama, adapter, lambda: calls.append(1) or {"ppl": -1.0}, plan, progress=False,
                              cache=tmp_path / "c", cache_salt="m")
    assert again == rows and not calls  # every condition came from the cache
    other = run_interventions(tiny_llama, adapter, lambda: calls.append(1) or {"ppl": -1.0}, plan[:2],
                              progress=False, cache=tmp_path / "c", cache_salt="another model")
    assert len(calls) == 2 and other[0]["ppl"] == -1.0
    s = summarize(rows, ["ppl"])
    base = s["baseline"]["ppl"]
    assert s["amplify"][0]["ppl"]["network"] == pytest.approx(base)  # gain 1 changes nothing
    assert s["mask"][0]["ppl"]["network"] != pytest.approx(base)
    r = s["mask"][0]["ppl"]
    assert r["random_min"] <= r["random_mean"] <= r["random_max"]
    assert _hooks(tiny_llama) == 0


def test_verdicts_follow_the_stated_rules():
    rec = {"observed_median": 0.6, "chance_p99": 0.2, "observed_match_rate": 0.8, "chance_match_rate": 0.0}
    row = lambda net, lo, hi: {"ppl": {"network": net, "random_min": lo, "random_max": hi}}  # noqa: E731
    summary = {"baseline": {"ppl": 10.0, "mean_acc": 0.5},
               "mask": [{"x": 1, **row(100.0, 11.0, 12.0)}, {"x": 2, **row(13.0, 11.0, 14.0)}],
               "keep": [{"x": 5, **row(14.0, 40.0, 50.0)}],
               "amplify": [{"x": 2.0, "ppl": {"network": 12.0}, "mean_acc": {"network": 0.45}}]}
    v = verdicts({"recurrence": rec, "summary": summary})
    assert v == {"recurrence": "holds", "masking": "partly", "keep-only": "holds", "amplification": "does not hold"}
    # one more item right out of 100 is noise, not an improvement; ten more is
    settings = {"subset": 100, "tasks": ["piqa"]}
    summary["amplify"] = [{"x": 2.0, "ppl": {"network": 12.0}, "mean_acc": {"network": 0.51}}]
    assert verdicts({"recurrence": rec, "summary": summary, "settings": settings})["amplification"] == "does not hold"
    summary["amplify"] = [{"x": 2.0, "ppl": {"network": 12.0}, "mean_acc": {"network": 0.61}}]
    assert verdicts({"recurrence": rec, "summary": summary, "settings": settings})["amplification"] == "holds"
    rec["observed_median"] = 0.1
    summary["keep"] = [{"x": 5, **row(30.0, 40.0, 50.0)}]
    v = verdicts({"recurrence": rec, "summary": summary})
    assert v["recurrence"] == "partly" and v["keep-only"] == "partly"


def test_analyze_command_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    from fbnprune.cli import main

    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
    env = make_tiny_env(tmp_path)
    recipe = {
        "name": "tiny-analyze", "model": {"source": str(env / "model")},
        "collect": {"source": str(env / "calib.txt"), "n_tokens": 512, "seq_len": 32, "keep_activations": True},
        "discover": {"n_components": 8, "n_restarts": 2, "block_rows": 128},
        "analyze": {"perplexity": {"source": str(env / "eval.txt"), "seq_len": 32, "max_tokens": 256},
                    "tasks": [], "mask_top": [1, 2], "keep_top": [1, 4], "gains": [2.0], "random_seeds": 2,
                    "shuffles": 3},
        "evaluate": None, "export": None,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["analyze", str(tmp_path / "r.yaml"), "-o", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"analysis.json", "analysis.md", "brain_map.png", "recurrence.png",
                                                 "interventions.png"}
    rep = json.loads((out / "analysis.json").read_text())
    assert len(rep["rows"]) == 1 + 2 * 3 + 2 * 3 + 1 * 3
    assert rep["recurrence"]["runs"] >= 2
    from transformers import AutoTokenizer

    from fbnprune.models.feed import start_tokens

    start = start_tokens(AutoTokenizer.from_pretrained(env / "model"))  # the feed is the tokenizer's own start
    assert rep["feed"] == {"bos": bool(start), "start_tokens": start}
    assert "## Verdicts" in (out / "analysis.md").read_text() and f"(bos: {bool(start)})" in (out / "analysis.md").read_text()
    from fbnprune.analyze.report import main as rerender

    (out / "analysis.md").unlink()  # the markdown can be re-rendered from the JSON alone
    assert rerender([str(out / "analysis.json")]) == 0 and "## Verdicts" in (out / "analysis.md").read_text()
    assert rerender([str(out / "missing.json")]) == 2
    # a recipe without stored activations is refused with one line, nothing written
    recipe["collect"]["keep_activations"] = False
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["analyze", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()
