"""compare: fresh-process probes of a dense and a slim export give consistent, tie-aware numbers."""

from __future__ import annotations

import json

import pytest

from fbnprune.export import export_hf
from fbnprune.export.compare import compare, machine, main, param_breakdown, weight_bytes
from fbnprune.prune.plan import count_params
from tests.conftest import tiny_model
from tests.export.helpers import slim_model, tiny_tokenizer


@pytest.mark.integration  # fresh-process probes: 18-28 s on two busy cores
def test_compare_reports_dense_vs_slim(tmp_path):
    dense = tiny_model("llama")
    slim, plan = slim_model("llama", "uniform", sparsity=0.5)
    d = export_hf(dense, tiny_tokenizer(), tmp_path / "dense")
    s = export_hf(slim, tiny_tokenizer(), tmp_path / "slim", plan=plan)
    rep = compare(d, s, threads=1, new_tokens=4, rounds=1, runs=1, prompt="w3 w4 w5", progress=False)
    for k in ("dense_params", "slim_params", "dense_bytes", "slim_bytes", "dense_peak_rss_mb", "slim_peak_rss_mb",
              "dense_tok_s", "slim_tok_s", "machine"):
        assert k in rep, k
    assert rep["dense_params"] == count_params(dense) and rep["slim_params"] == count_params(slim)
    assert rep["dense_params"] - rep["slim_params"] == 2 * 3 * 64 * 64  # 2 layers x 3 projections x 64 neurons
    assert rep["dense_bytes"] == weight_bytes(d) > rep["slim_bytes"] == weight_bytes(s)
    assert rep["slim_tok_s"] > 0 and rep["dense_peak_rss_mb"] > 0
    assert rep["probes"]["slim"][0]["new_tokens"] == 4  # EOS suppressed: exactly the requested tokens
    assert rep["target_speedup"] == round(0.9 * rep["param_ratio"], 4)
    assert set(rep["machine"]) >= {"cpu", "cores", "loadavg", "busy", "torch_threads"}
    pb = param_breakdown(s)
    assert pb["mlp"] == 2 * 3 * 64 * 64 and pb["embed_head"] == 2 * 256 * 64  # untied tiny Llama


def test_machine_description():
    m = machine()
    assert m["cores"] >= 1 and len(m["loadavg"]) == 3 and isinstance(m["busy"], bool)


def test_cli_requires_two_dirs(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "DENSE_DIR" in capsys.readouterr().err
    json.dumps(machine())
