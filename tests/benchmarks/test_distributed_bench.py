"""benchmarks/distributed/run.py on the tiny model: rows with processes, wall time, equality and provenance."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.benchmarks import BENCHMARKS, load_script
from tests.conftest import make_tiny_env


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCHMARKS / "distributed" / "run.py", "distributed_bench")


def test_command_lines(bench, tmp_path):
    one = bench.command("quickstart", ["a=1"], tmp_path, 1, "torchrun")
    assert one[1:] == ["-m", "fbnprune", "run", "quickstart", "a=1", "-o", str(tmp_path)]
    two = bench.command("quickstart", [], tmp_path, 2, "torchrun")
    assert two[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    acc = bench.command("quickstart", [], tmp_path, 2, "accelerate")
    assert "--multi_gpu" in acc and acc[acc.index("--num_processes") + 1] == "2"


def test_compare_names_what_differs(bench, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    rep = {"results": {"dense": {"ppl_x_32": {"nll": 1.5}}, "pruned": {"ppl_x_32": {"nll": 2.0},
                                                                        "retention": {"kl": 0.1}}},
           "networks": {"per_layer": [{"layer": 0}]}}
    (a / "report.json").write_text(json.dumps(rep))
    (a / "keep_plan.json").write_text("{}")
    shutil.copytree(a, b)
    assert bench.compare(a, b) == {"keep_plan": True, "perplexity": True, "retention": True, "networks": True}
    rep["results"]["pruned"]["ppl_x_32"]["nll"] = 2.0000000001
    (b / "report.json").write_text(json.dumps(rep))
    assert bench.compare(a, b)["perplexity"] is False


@pytest.mark.slow  # ~35 s on 2 busy cores: the whole tiny recipe once in one process, once in two
def test_one_and_two_processes_on_the_tiny_model(bench, tmp_path):
    env = make_tiny_env(tmp_path / "env")
    recipe = {
        "name": "tiny", "model": {"source": str(env / "model")},
        "collect": {"source": str(env / "calib.txt"), "n_tokens": 512, "seq_len": 32, "keep_activations": True,
                    "batch_size": 3},
        "prune": {"method": "fbn", "sparsity": 0.25, "protected_layers": []},
        "discover": {"n_components": 8, "n_restarts": 2, "block_texts": None, "block_rows": 128},
        "evaluate": {"perplexity": [{"source": str(env / "eval.txt"), "seq_len": 32, "max_tokens": 512,
                                     "batch_size": 3}],
                     "retention": {"source": str(env / "eval.txt"), "n_tokens": 128, "seq_len": 32}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "results.json"
    assert bench.main(["--recipe", str(tmp_path / "r.yaml"), "--processes", "2", "--out", str(out),
                       "--work", str(tmp_path / "work"), "--timeout", "300"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["processes"] for r in rows] == [1, 2]  # the single-process reference is always run
    assert all(r["wall_s"] > 0 and r["equal_to_single"] for r in rows)
    assert rows[1]["details"] == {"keep_plan": True, "perplexity": True, "retention": True, "networks": True,
                                  "export": True}
    assert "torch.distributed.run --standalone --nproc_per_node 2 -m fbnprune run" in rows[1]["command"]
    assert {"machine", "versions", "date", "command"} <= set(rows[1])
    assert (tmp_path / "work" / "p2" / "out" / "keep_plan.json").is_file()
