"""The shared benchmark runner (benchmarks/runner.py) and the leaderboard harness on it, on a tiny random Llama:
fresh copies per cell, the protocol's measurements, atomic resumable cell files, provenance, shared scores, and
the leaderboard's cell order, --carry-from and --results."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
import yaml

import fbnprune.run as pipeline
from benchmarks.runner import Bench, CellDir, Protocol, command_line, record, share_scores, write_json
from fbnprune.errors import UserError
from fbnprune.recipe import Recipe
from tests.benchmarks import BENCHMARKS, load_script

# every test of this module gets its own fbnprune cache
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture
def restore_scoring(monkeypatch):
    """share_scores replaces the pipeline's scoring for the process; put the real one back after the test."""
    monkeypatch.setattr(pipeline, "score_neurons", pipeline.score_neurons)


def tiny_recipe(env, **prune) -> dict:
    return {"name": "tiny", "model": {"source": str(env / "model")},
            "collect": {"source": str(env / "calib.txt"), "n_tokens": 512, "seq_len": 32, "keep_activations": True},
            "prune": {"method": "wanda_sp", "sparsity": 0.25, "protected_layers": [], **prune},
            "evaluate": None, "export": None}


def tiny_protocol(env) -> Protocol:
    return Protocol(seq_lens=(16, 32), ppl_source=str(env / "eval.txt"), ppl_tokens=512, progress=False,
                    retention={"source": str(env / "eval.txt"), "n_tokens": 128, "seq_len": 32, "seed": 1})


@pytest.fixture
def bench(tiny_env):
    return Bench(Recipe.model_validate(tiny_recipe(tiny_env)), tiny_protocol(tiny_env))


def widths(model) -> list[int]:
    return [layer.mlp.down_proj.in_features for layer in model.model.layers]


def test_cell_prunes_a_copy_and_the_dense_model_stays(bench):
    before = {k: v.clone() for k, v in bench.dense.state_dict().items()}
    r = bench.prune(bench.recipe_with(sparsity=0.5))
    assert widths(r.lm.model) == [64, 64] and widths(bench.dense) == [128, 128]
    assert all(torch.equal(v, bench.dense.state_dict()[k]) for k, v in before.items())
    assert set(r.report["seconds"]) == {"discover", "plan", "prune"}
    assert r.store is bench.base.store and r.calib is bench.base.calib  # calibrated once
    res = bench.evaluate(r.lm.model, "cell")
    assert set(res) == {"ppl16", "ppl32", "retention"}
    assert res["ppl16"]["seq_len"] == 16 and res["ppl32"]["windows"] == 16  # 512 tokens of one stream
    assert res["retention"]["kl"] > 0 and 0 <= res["retention"]["top1_agreement"] <= 1
    assert res["retention"]["source"] == str(bench.protocol.retention["source"]) and res["retention"]["sha256"]
    dense = bench.evaluate(bench.dense, "dense")
    assert set(dense) == {"ppl16", "ppl32"}  # no retention of the dense model against itself
    assert dense["ppl32"]["ppl"] < res["ppl32"]["ppl"]


def test_recipe_with_validates(bench):
    assert bench.recipe_with(method="magnitude", mode="mask").prune.mode == "mask"
    with pytest.raises(Exception, match="unknown scorer"):
        bench.recipe_with(method="no_such_scorer")


def test_a_benchmark_never_calibrates_on_self_generated_text(tiny_env, monkeypatch):
    monkeypatch.setattr(pipeline, "data_dir", lambda: None)
    recipe = Recipe.model_validate({**tiny_recipe(tiny_env), "collect": {"source": "wikitext2-valid"}})
    with pytest.raises(UserError, match="does not fall back"):
        Bench(recipe)


def test_share_scores_scores_once_per_method_and_sparsity(bench, restore_scoring, monkeypatch):
    calls = []
    real = pipeline.score_neurons

    def counting(method, ctx):
        calls.append((method, ctx.sparsity))
        return real(method, ctx)

    monkeypatch.setattr(pipeline, "score_neurons", counting)
    share_scores()
    a = bench.prune(bench.recipe_with(compensate="none"))
    b = bench.prune(bench.recipe_with(compensate="bias", allocation="global"))
    assert calls == [("wanda_sp", 0.25)]
    assert a.plan is not None and b.plan is not None and a.plan.sparsity == pytest.approx(b.plan.sparsity, abs=0.01)
    bench.prune(bench.recipe_with(sparsity=0.5))
    assert calls == [("wanda_sp", 0.25), ("wanda_sp", 0.5)]


def test_cell_dir_is_atomic_and_resumable(tmp_path):
    cells = CellDir(tmp_path / "m")
    cells.write("a", {"x": 1})
    (tmp_path / "m" / "b.json.partial").write_text("{")  # what a killed writer leaves: not a finished cell
    assert cells.todo(["b", "a", "c"]) == ["b", "c"]
    assert cells.read("a") == {"x": 1} and cells.read("c") is None
    write_json(tmp_path / "m" / "b.json", {"y": 2}, indent=None)
    assert cells.todo(["a", "b"]) == [] and not (tmp_path / "m" / "b.json.partial").exists()


def test_command_line_and_record(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cmd = command_line(["benchmarks/x.py", "--cells", "fbn-*", "a b"])
    assert cmd.startswith("OMP_NUM_THREADS=2 ") and cmd.endswith(" benchmarks/x.py --cells 'fbn-*' 'a b'")
    rec = record("cmd")
    assert rec["command"] == "cmd" and rec["date"].endswith("Z")
    assert {"cpu", "cores", "loadavg", "busy"} <= set(rec["machine"])
    assert {"git_sha", "fbnprune", "torch"} <= set(rec["versions"])


# ------------------------------------------------------------------------------------------------ leaderboard
def grid_recipe(env, name: str, **prune) -> dict:
    r = tiny_recipe(env, **prune)
    return {**r, "name": f"tiny-{name}"}


@pytest.fixture
def leaderboard(tmp_path, tiny_env, restore_scoring):
    """The leaderboard's run.py in a folder of its own: a protocol on the tiny env's text, a grid of three tiny
    recipes, and an archived version with two cells to carry over."""
    d = tmp_path / "leaderboard"
    d.mkdir()
    shutil.copy(BENCHMARKS / "leaderboard" / "run.py", d / "run.py")
    proto = {"version": 9, "calibration": {"source": str(tiny_env / "calib.txt"), "n_tokens": 512, "seq_len": 32,
                                           "seed": 0, "drop_first": 0},
             "perplexity": {"source": str(tiny_env / "eval.txt"), "max_tokens": 512, "seq_lens": [16, 32]},
             "retention": {"source": str(tiny_env / "eval.txt"), "n_tokens": 128, "seq_len": 32, "seed": 1},
             "tasks": [], "task_subset": {"items": 10, "seed": 0}, "batch_size": 4}
    (d / "protocol.yaml").write_text(yaml.safe_dump(proto))
    grid = d / "grid" / "tiny"
    grid.mkdir(parents=True)
    for name, prune in (("a-25", {"method": "wanda_sp"}), ("b-25", {"method": "magnitude"}),
                        ("b-50", {"method": "magnitude", "sparsity": 0.5})):
        (grid / f"{name}.yaml").write_text(yaml.safe_dump(grid_recipe(tiny_env, name, **prune)))
    return d, load_script(d / "run.py", "leaderboard_run")


def archive(d, cells: dict[str, dict]) -> None:
    """An archived version 'v8' of the tiny leaderboard holding ``cells`` (name -> eval_info)."""
    old = d / "v8" / "results" / "tiny"
    old.mkdir(parents=True)
    for name, ev in cells.items():
        (old / f"{name}.json").write_text(json.dumps({"eval_info": ev}))


def test_leaderboard_order_carry_over_results_dir_and_resume(leaderboard, tmp_path, capsys, monkeypatch):
    d, mod = leaderboard
    # the archive: dense and a-25 as this code measures them, except a ppl16 that marks them as carried; b-50 with
    # a ppl32 this code does not reproduce (as if discovery had changed since that version)
    fresh = tmp_path / "fresh"
    assert mod.main(["--model", "tiny", "--cells", "a-25", "b-50", "--results", str(fresh)]) == 0
    measured = {n: json.loads((fresh / "tiny" / f"{n}.json").read_text())["eval_info"] for n in ("dense", "a-25", "b-50")}
    true_b50 = measured["b-50"]["ppl32"]["ppl"]
    archive(d, {"dense": {**measured["dense"], "ppl16": {"ppl": 10.0}},
                "a-25": {**measured["a-25"], "ppl16": {"ppl": 123.0}},
                "b-50": {**measured["b-50"], "ppl32": {"ppl": true_b50 * 1.01}}})
    capsys.readouterr()
    res = tmp_path / "elsewhere"
    argv = ["--model", "tiny", "--cells", "b-*", "a-25", "--carry-from", "v8", "--results", str(res)]
    monkeypatch.setattr(sys, "argv", ["benchmarks/leaderboard/run.py", *argv])
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert [ln.split("cell ")[1] for ln in out.splitlines() if "] cell " in ln] == ["b-25", "b-50", "a-25"]
    assert not (d / "results").exists()  # --results: nothing written to the leaderboard's own folder
    cells = {p.stem: json.loads(p.read_text()) for p in (res / "tiny").glob("*.json")}
    assert set(cells) == {"dense", "a-25", "b-25", "b-50"}
    a, b, dense = cells["a-25"], cells["b-25"], cells["dense"]
    # carried: the archived perplexities, a retention entry measured now, where they came from and the check
    assert a["eval_info"]["ppl16"] == {"ppl": 123.0} and a["eval_info"]["retention"]["kl"] > 0
    assert a["meta_info"]["carried_from"] == "v8/results/tiny/a-25.json (perplexity, tasks)"
    check = a["meta_info"]["carry_check"]
    assert check["seq_len"] == 32 and check["remeasured"] == pytest.approx(check["archived"], rel=1e-6)
    assert dense["eval_info"]["ppl16"] == {"ppl": 10.0} and "carried_from" in dense["meta_info"]
    # not reproduced: measured in full, and the cell says why
    b50 = cells["b-50"]
    assert b50["eval_info"]["ppl32"]["ppl"] == pytest.approx(true_b50, rel=1e-6) and "seq_len" in b50["eval_info"]["ppl16"]
    assert "carried_from" not in b50["meta_info"] and b50["eval_info"]["retention"]["kl"] > 0
    refused = b50["meta_info"]["carry_refused"]
    assert refused["archived"] == pytest.approx(true_b50 * 1.01) and refused["from"].startswith("v8/results/tiny/b-50")
    assert "b-50: re-pruned ppl@32" in out
    # not in the archive: measured under this protocol
    assert b["eval_info"]["ppl16"]["seq_len"] == 16 and "carried_from" not in b["meta_info"]
    assert b["run_info"]["method"] == "magnitude" and b["run_info"]["kept_widths"] == [96, 96]
    assert cells["b-50"]["run_info"]["kept_widths"] == [64, 64]
    for c in cells.values():  # what the board reads
        meta = c["meta_info"]
        assert meta["command"].endswith("run.py " + " ".join(argv).replace("b-*", "'b-*'"))
        assert {"cpu", "cores", "busy"} <= set(meta["machine"]) and meta["provenance"]["date"]
        assert meta["provenance"]["git_sha"] and isinstance(meta["seconds"], float)
        assert c["eval_info"]["params"] > 0
    stamps = {p.name: p.stat().st_mtime_ns for p in (res / "tiny").iterdir()}
    assert mod.main(argv) == 0  # resumable: everything is done, nothing is loaded or rewritten
    assert "0 to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (res / "tiny").iterdir()} == stamps


def test_leaderboard_skips_a_cell_another_run_finished_meanwhile(leaderboard, tmp_path, capsys, monkeypatch):
    """Two runs may share one results folder (one per core, from the grid's two ends): a cell the other run wrote
    after this one started is not measured again."""
    d, mod = leaderboard
    res = tmp_path / "shared"
    other = {"run_info": {"cell": "b-50"}, "eval_info": {"by": "the other run"}}
    prune = mod.Bench.prune

    def prune_then_other_run_finishes(self, recipe):
        r = prune(self, recipe)
        (res / "tiny" / "b-50.json").write_text(json.dumps(other))
        return r

    monkeypatch.setattr(mod.Bench, "prune", prune_then_other_run_finishes)
    assert mod.main(["--model", "tiny", "--cells", "b-25", "b-50", "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert "2 to run" in out and "] cell b-25" in out and "] cell b-50" not in out
    assert json.loads((res / "tiny" / "b-50.json").read_text()) == other
    assert json.loads((res / "tiny" / "b-25.json").read_text())["run_info"]["cell"] == "b-25"
