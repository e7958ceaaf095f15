"""The fbn rule study, the baseline grid and the evaluation suite on the shared runner, end to end on a tiny random
Llama and a made-up data directory: each writes the results layout its readers expect, with its provenance, and a
rerun measures nothing twice."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import fbnprune.run as pipeline
from fbnprune.prune import SCORERS
from tests.benchmarks import BENCHMARKS, load_script
from tests.conftest import WORDS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Word text in the data directory's layout: WikiText-2 valid and test, and the c4 calibration file."""
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(1)
    for rel, lines in (("wikitext-2/valid.txt", 400), ("wikitext-2/test.txt", 500), ("calibration/c4.utf8", 400)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,),
                                                                                           generator=g))
                                          for _ in range(lines)))
    return root


@pytest.fixture(autouse=True)
def setting(tmp_path, data, monkeypatch):
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FBNPRUNE_DATA", str(data))
    monkeypatch.setattr(pipeline, "score_neurons", pipeline.score_neurons)  # restored after share_scores
    saved_path, saved_scorers = list(sys.path), dict(SCORERS._items)
    yield
    sys.path[:] = saved_path
    sys.modules.pop("variants", None)  # the study's scorers leave the registry again
    SCORERS._items.clear()
    SCORERS._items.update(saved_scorers)


def run_main(mod, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()


def test_fbn_rules_cells_and_tables(tiny_env, tmp_path, monkeypatch):
    mod = load_script(BENCHMARKS / "fbn_rules" / "run.py", "fbn_rules_run")
    summarize = load_script(BENCHMARKS / "fbn_rules" / "summarize.py", "fbn_rules_summarize")
    monkeypatch.chdir(tiny_env)  # --model names a folder: the results go under <out>/model/
    argv = ["run.py", "--model", "model", "--variants", "wanda_sp,obs", "--sparsities", "0.25",
            "--compensations", "none,refit", "--eval-tokens", "1024", "--out", str(tmp_path / "out")]
    run_main(mod, argv, monkeypatch)
    d = tmp_path / "out" / "model" / "ppl1024"
    assert sorted(p.name for p in d.iterdir()) == ["dense.json", "obs__0.25__none.json", "obs__0.25__refit.json",
                                                    "wanda_sp__0.25__none.json", "wanda_sp__0.25__refit.json"]
    cell = json.loads((d / "obs__0.25__refit.json").read_text())
    assert cell["kept_widths"] == [96, 96] and cell["achieved_sparsity"] == 0.25
    assert cell["refit_rel_error_mean"]["refit"] < cell["refit_rel_error_mean"]["pruned"]
    assert cell["command"].endswith("run.py " + " ".join(argv[1:]))
    assert cell["git_sha"] == cell["versions"]["git_sha"] and cell["protocol"]["calibration"]["drop_first"] == 1
    assert {"platform", "cpus", "torch", "loadavg", "note", "cores", "busy"} <= set(cell["machine"])
    table = summarize.table(d)
    assert table[0].startswith("### model, perplexity on the first 1,024 tokens of wikitext2-test")
    assert table[table.index("| variant | 25% none | 25% refit |") + 2].startswith("| wanda_sp | ")
    stamps = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    run_main(mod, argv, monkeypatch)  # resumable: every cell is done
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == stamps


def test_prune_baselines_results_file(tiny_env, tmp_path, monkeypatch):
    mod = load_script(BENCHMARKS / "prune_baselines" / "run.py", "prune_baselines_run")
    monkeypatch.setitem(mod.PROTOCOL, "model", str(tiny_env / "model"))
    monkeypatch.setitem(mod.PROTOCOL["evaluation"], "max_tokens", 2048)  # 4 windows: seconds, not a minute
    argv = ["run.py", "--scorers", "wanda_sp,magnitude", "--sparsities", "0.25", "--compensations", "none,bias",
            "--out", str(tmp_path)]
    run_main(mod, argv, monkeypatch)
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(c["scorer"], c["compensate"]) for c in res["cells"]] == [
        ("wanda_sp", "none"), ("magnitude", "none"), ("wanda_sp", "bias"), ("magnitude", "bias")]
    assert all(c["kept_width"] == 96 and c["ppl"] != res["dense"]["ppl"] for c in res["cells"])
    assert res["dense"]["windows"] == 4
    assert res["finished"] and res["git_sha"] == res["versions"]["git_sha"] and "cores" in res["machine"]
    assert res["protocol"]["model"] == str(tiny_env / "model")
    md = (tmp_path / "results.md").read_text()
    assert "| wanda_sp | " in md and "Machine: " in md and "torch threads" in md
    run_main(mod, argv, monkeypatch)  # resumable: the same four cells, none measured again
    assert len(json.loads((tmp_path / "results.json").read_text())["cells"]) == 4


def test_eval_suite_parts_and_report(tiny_env, tmp_path, monkeypatch):
    import functools

    import fbnprune.evaluate.speed as speed

    mod = load_script(BENCHMARKS / "eval_suite" / "run_suite.py", "eval_suite_run")
    # four timed generations of 64 tokens take a minute on two busy cores: 8 tokens, one repeat
    monkeypatch.setattr(speed, "model_stats", functools.partial(speed.model_stats, new_tokens=8, repeats=1))
    common = ["--out", str(tmp_path), "--model", str(tiny_env / "model"), "--steps", "ppl@128",
              "--ppl-max-tokens", "1024"]
    for part in ("dense", "pruned", "report"):
        run_main(mod, ["run_suite.py", "--part", part, *common], monkeypatch)
    dense, pruned = (json.loads((tmp_path / f"{p}.json").read_text()) for p in ("dense", "pruned"))
    assert dense["perplexity"]["wikitext2-test@128"]["windows"] == 8 and "pruning" not in dense
    assert pruned["pruning"]["kept_widths"] == [104] and pruned["pruning"]["calibration"]["tokens"] >= 8192
    assert pruned["agreement"]["kl"] > 0 and pruned["agreement"]["seq_len"] == 256
    assert set(pruned["model_stats"]) == {"dense", "pruned"}
    assert pruned["perplexity"]["wikitext2-test@128"]["ppl"] != dense["perplexity"]["wikitext2-test@128"]["ppl"]
    run = pruned["runs"][-1]
    assert run["git_sha"] == run["versions"]["git_sha"] and "--part pruned" in run["command"] and run["seconds"] >= 0
    assert (tmp_path / "report.md").read_text().startswith("# Retention report:")
