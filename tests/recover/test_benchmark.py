"""The recovery benchmark harness end to end on a tiny random Llama and a made-up data directory: one row per cell
with the issue's fields, before measured once per sparsity, and a rerun measures nothing twice."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoTokenizer

import fbnprune.run as pipeline
from fbnprune.models.feed import start_tokens
from tests.benchmarks import BENCHMARKS, load_script
from tests.conftest import WORDS, make_tiny_env


@pytest.fixture
def data(tmp_path):
    g = torch.Generator().manual_seed(1)
    for rel, lines in (("wikitext-2/valid.txt", 300), ("wikitext-2/test.txt", 300), ("calibration/c4.utf8", 100),
                       ("calibration/technical.utf8", 100), ("calibration/wiki.utf8", 300)):
        path = tmp_path / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g))
                                  for _ in range(lines)))
    return tmp_path / "data"


def test_recovery_harness_rows(tmp_path, data, monkeypatch):
    env = make_tiny_env(tmp_path / "tiny")
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FBNPRUNE_DATA", str(data))
    monkeypatch.setattr(pipeline, "score_neurons", pipeline.score_neurons)
    saved = list(sys.path)
    mod = load_script(BENCHMARKS / "recovery" / "run.py", "recovery_run")
    argv = ["run.py", "--models", str(env / "model"), "--sparsities", "0.5", "--budgets", "0.002",
            "--data", "c4+technical", "--methods", "full,lora", "--tasks", "", "--seq-lens", "32",
            "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        mod.main()
        rows = json.loads((tmp_path / "out" / "results.json").read_text())
        assert [r["recovery"] for r in rows] == ["full", "lora"]
        bos = bool(start_tokens(AutoTokenizer.from_pretrained(env / "model")))  # the feed every file must record
        for r in rows:
            assert {"model", "method", "sparsity", "data", "budget_min", "dense_ppl32", "ppl32_before", "ppl32_after",
                    "kl_before", "kl_after", "command", "machine"} <= set(r)
            assert r["data"] == "c4+technical" and r["training"]["data"] == ["c4", "technical"]
            assert r["training"]["stop"] == "max_minutes" and r["training"]["steps"] >= 1
            assert r["budget_tokens"] is None and r["budget_tokens_per_minute"] is None  # a wall-time budget
            assert r["ppl32_before"] == rows[0]["ppl32_before"]  # every recovery starts from the same pruned model
            assert r["bos"] is bos
        cells = tmp_path / "out" / "results" / "model"
        assert all(json.loads((cells / f"{n}.json").read_text())["eval"]["bos"] is bos for n in ("dense", "before-0.5"))
        stamps = {p.name: p.stat().st_mtime_ns for p in cells.iterdir()}
        assert len(stamps) == 4  # dense, before-0.5 and the two recoveries
        mod.main()  # every cell is done: nothing is measured again
        assert {p.name: p.stat().st_mtime_ns for p in cells.iterdir()} == stamps
    finally:
        sys.path[:] = saved


def test_recovery_harness_token_budget(tmp_path, data, monkeypatch):
    """``--tokens-per-minute``: the budget is a token count (a cell's result no longer depends on the load), and
    the cell is named apart from a wall-time cell of the same minutes."""
    env = make_tiny_env(tmp_path / "tiny")
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FBNPRUNE_DATA", str(data))
    saved = list(sys.path)
    mod = load_script(BENCHMARKS / "recovery" / "run.py", "recovery_run_tokens")
    argv = ["run.py", "--models", str(env / "model"), "--sparsities", "0.5", "--budgets", "2",
            "--data", "c4", "--methods", "full", "--tasks", "", "--seq-lens", "32",
            "--tokens-per-minute", "model=2500", "--set", "seq_len=16", "--set", "lr=3e-4",
            "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        mod.main()
        (r,) = json.loads((tmp_path / "out" / "results.json").read_text())
        assert r["budget_tokens"] == 5000 and r["budget_min"] == 2 and r["budget_tokens_per_minute"] == 2500
        assert r["training"]["stop"] == "max_tokens" and r["training"]["budget"]["max_minutes"] is None
        t = r["training"]
        assert t["steps"] > 1 and 5000 <= t["tokens"] < 5000 + t["tokens"] / t["steps"]  # stops once past it
        assert r["seq_len"] == 16 and r["lr"] == 3e-4 and r["batch_size"] == 8  # --set reached the training
        assert t["steps"] == -(-5000 // (16 * 8))
        name = "obs-refit-0.5__c4__2min-5000tok__full__lr=0.0003__seq_len=16.json"
        assert (tmp_path / "out" / "results" / "model" / name).is_file()
        assert "full mlp, 16x8, lr 0.0003" in (tmp_path / "out" / "results.md").read_text()
        for bad in (["method=lora"], ["seq_len"], ["nope=1"], ["seq_len=1"], ["rank=0"]):
            with pytest.raises(SystemExit, match="--set"):
                mod.parse_settings(bad)
        assert mod.parse_settings(["target_modules=[all]", "lr=1e-3"]) == {"target_modules": ["all"], "lr": 0.001}
        for bad in ("model", "model=0", "model=x", "=5"):
            with pytest.raises(SystemExit, match="tokens-per-minute"):
                mod.parse_rates(bad)
        assert mod.parse_rates("a/b/smollm2-135m=10800, gemma=1.5") == {"smollm2-135m": 10800.0, "gemma": 1.5}
    finally:
        sys.path[:] = saved


def test_recovery_harness_network_ablation(tmp_path, data, monkeypatch):
    """``--network-weights 0,1``: a logits-only cell and one with the network-activity loss, at the same token
    budget, from the same pruned model; the second one discovered networks and trained on both losses."""
    env = make_tiny_env(tmp_path / "tiny")
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FBNPRUNE_DATA", str(data))
    # the default discovery (128 components) is for real widths: on the tiny model's few neurons its ICA runs fail
    # at some thread counts, so the harness gets a discovery sized for them
    from fbnprune.discover import DiscoverConfig

    monkeypatch.setattr(pipeline, "default_discover", lambda r: DiscoverConfig(
        block_texts=None, block_rows=512, n_components=4, n_restarts=2, threshold=3.0, max_iter=200))
    saved = list(sys.path)
    mod = load_script(BENCHMARKS / "recovery" / "run.py", "recovery_run_networks")
    argv = ["run.py", "--models", str(env / "model"), "--sparsities", "0.5", "--budgets", "1",
            "--data", "c4", "--methods", "full", "--tasks", "", "--seq-lens", "32",
            "--tokens-per-minute", "model=3000", "--network-weights", "0,1", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", argv)
    try:
        mod.main()
        rows = json.loads((tmp_path / "out" / "results.json").read_text())
        by_weight = {r["network_weight"]: r for r in rows}
        assert set(by_weight) == {0.0, 1.0}
        assert by_weight[0.0]["budget_tokens"] == by_weight[1.0]["budget_tokens"] == 3000
        assert by_weight[0.0]["ppl32_before"] == by_weight[1.0]["ppl32_before"]
        assert by_weight[0.0]["ppl32_after"] != by_weight[1.0]["ppl32_after"]  # the extra loss changed training
        cells = tmp_path / "out" / "results" / "model"
        plain = json.loads((cells / "obs-refit-0.5__c4__1min-3000tok__full.json").read_text())
        net = json.loads((cells / "obs-refit-0.5__c4__1min-3000tok__full__net1.json").read_text())
        assert plain["recovery"]["loss_terms"] == ["kl"] and net["recovery"]["loss_terms"] == ["kl", "network"]
        table = (tmp_path / "out" / "results.md").read_text().splitlines()
        body = [line for line in table if line.startswith("| model | 0.5 | c4 |")]  # the tiny model is "model"
        assert len(body) == 2 and "| 0 |" in body[0] and "| 1 |" in body[1]  # one line per cell, by network weight
        for bad in ("", "x", "-1", "0,-0.5"):
            with pytest.raises(SystemExit, match="network-weights"):
                mod.parse_weights(bad)
        assert mod.parse_weights("0, 0.5") == [0.0, 0.5]
    finally:
        sys.path[:] = saved


def test_recovery_settings_probe(tmp_path, data, monkeypatch):
    """settings.py: each candidate trains the same pruned model for the same tokens and is judged on validation
    text (ppl in windows of two lengths), one row each; a rerun adds nothing."""
    env = make_tiny_env(tmp_path / "tiny")
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FBNPRUNE_DATA", str(data))
    saved = list(sys.path)
    mod = load_script(BENCHMARKS / "recovery" / "settings.py", "recovery_settings")
    out = tmp_path / "settings.json"
    args = ["--model", str(env / "model"), "--sparsity", "0.5", "--tokens-budget", "4096", "--tokens", "4096",
            "--seq-lens", "16,32", "--candidates", "base,lr3e-4", "--out", str(out)]
    try:
        monkeypatch.setattr(mod, "CANDIDATES", {"base": {}, "lr3e-4": {"lr": 3e-4},
                                                "seq2048": {"seq_len": 64, "batch_size": 1}})
        assert mod.main(args) == 0
        rows = json.loads(out.read_text())["rows"]
        assert [r["candidate"] for r in rows] == ["base", "lr3e-4"]
        assert rows[0]["before"] == rows[1]["before"] and rows[0]["after"] != rows[1]["after"]
        for r in rows:
            assert r["training"]["tokens"] >= 4096 and r["training"]["stop"] == "max_tokens"
            assert set(r["after"]) == {"valid_ppl16", "valid_ppl32"}
            b, a, d = r["before"]["valid_ppl16"], r["after"]["valid_ppl16"], r["dense"]["valid_ppl16"]
            assert r["gap_closed"]["valid_ppl16"] == pytest.approx((b - a) / (b - d))
        mtime = out.stat().st_mtime_ns
        assert mod.main(args) == 0 and out.stat().st_mtime_ns == mtime  # both measured: nothing again
        with pytest.raises(SystemExit, match="unknown candidates"):
            mod.main([*args[:-4], "--candidates", "nope", "--out", str(out)])
    finally:
        sys.path[:] = saved


def test_self_text_beside_other_sources_leaves_them_whole():
    saved = list(sys.path)
    try:
        mod = load_script(BENCHMARKS / "recovery" / "run.py", "recovery_run_tokens")
        assert mod.self_tokens(["c4", "technical"], 4096) is None
        assert mod.self_tokens(["self"], 4096) == 4096  # what the self-only cells were measured with
        assert mod.self_tokens(["c4", "code", "self"], 4096) == {"self": 4096}
    finally:
        sys.path[:] = saved


def test_self_cells_are_named_by_their_sampled_tokens():
    """Two cells that differ only in how much text was sampled for ``self`` are two cells (a rerun with more
    sampled text must not find the smaller one finished), and the table says how much each sampled."""
    saved = list(sys.path)
    try:
        mod = load_script(BENCHMARKS / "recovery" / "run.py", "recovery_run_names")
        small, big = (mod.cell_name(0.3, "c4+self", 30, "full", 100.0, 0.0, {"lr": 3e-4}, n) for n in (4096, 8192))
        assert small != big and "self_tokens=8192" in big
        assert mod.cell_name(0.3, "c4", 30, "full", self_tokens=4096) == mod.cell_name(0.3, "c4", 30, "full",
                                                                                      self_tokens=8192)
        row = {"model": "m", "sparsity": 0.3, "data": "c4+self", "self_tokens": 8192, "budget_min": 30,
               "budget_tokens": None, "recovery": "full", "target_modules": ["all"], "lr": 3e-4, "dense_ppl32": 1.0,
               "ppl32_before": 3.0, "ppl32_after": 2.0, "gap_closed": 0.5, "kl_before": 1.0, "kl_after": 0.5,
               "tasks_mean_before": None, "tasks_mean_after": None, "tasks_mean_dense": None,
               "training": {"tokens": 10, "minutes": 1.0}}
        assert "| c4+self (8,192 self tokens) |" in mod.markdown([row])
        # a loss term beside the KL is part of how a cell trained, so two cells that differ in it read differently
        plain, with_lm = mod.markdown([row]), mod.markdown([{**row, "lm_weight": 0.5}])
        assert "LM loss" not in plain and "full all, 256x8, LM loss x0.5, lr 0.0003 |" in with_lm
    finally:
        sys.path[:] = saved
