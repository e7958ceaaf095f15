"""End to end on the real SmolLM2-135M: prune, evaluate, export, reload in a stock process with equal logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fbnprune.recipe import load_recipe
from fbnprune.run import run

pytestmark = pytest.mark.integration

SMALL = [
    "collect.n_tokens=1024",
    "collect.seq_len=256",
    "evaluate.perplexity=[{source: wikitext2-test, seq_len: 256, max_tokens: 2048}]",
    "evaluate.retention.n_tokens=256",
    "evaluate.retention.seq_len=64",
]

STOCK_RELOAD = r"""
import sys, json, torch
sys.modules["fbnprune"] = None  # prove the checkpoint loads without fbnprune
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    out = m(input_ids=ids).logits
torch.save(out, sys.argv[3])
print(m.config.intermediate_size)
"""


def test_quickstart_small_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    report = run(load_recipe("quickstart", SMALL), output_dir=out)
    res = report["results"]
    dense = res["dense"]["ppl_wikitext2-test_256"]["ppl"]
    pruned = res["pruned"]["ppl_wikitext2-test_256"]["ppl"]
    assert 10 < dense < 60, dense  # SmolLM2 on WikiText-2 is ~24 at 512 tokens
    assert dense < pruned < 3 * dense, (dense, pruned)  # 20% Wanda-sp hurts, but mildly
    assert res["plan"]["kept_widths"] == [1232] * 30
    assert res["pruned"]["params"] < res["dense"]["params"]
    assert 0 < res["pruned"]["retention"]["kl"] < 2 and res["pruned"]["retention"]["top1_agreement"] > 0.5
    for name in ("report.json", "keep_plan.json", "recipe.yaml", "model/config.json", "model/model.safetensors",
                 "model/fbnprune_provenance.json", "model/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers

    # The exported checkpoint reloads in a fresh stock-transformers process with the same logits.
    ids = [[1, 504, 3458, 314, 2683, 28, 253, 1789, 282, 5013]]
    in_mem = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    r = subprocess.run([sys.executable, "-c", STOCK_RELOAD, str(out / "model"), json.dumps(ids), str(tmp_path / "l.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "1232"
    with torch.no_grad():
        ref = in_mem(input_ids=torch.tensor(ids)).logits
    torch.testing.assert_close(torch.load(tmp_path / "l.pt"), ref, rtol=0, atol=1e-4)


def test_data_free_fallback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FBNPRUNE_DATA", str(tmp_path / "no-data-here"))
    out = tmp_path / "run"
    report = run(load_recipe("quickstart", [*SMALL, "collect.n_tokens=512", "export.enabled=false"]), output_dir=out)
    notes = " ".join(report["notes"])
    assert "data-free" in notes and "skipping perplexity" in notes
    assert report["calibration"]["source"].startswith("self(")
    ret = report["results"]["pruned"]["retention"]
    assert ret["source"].startswith("self(") and 0 < ret["kl"] and 0 < ret["top1_agreement"] <= 1
    assert (out / "report.json").is_file() and not (out / "model").exists()
