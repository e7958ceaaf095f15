"""The recover stage inside a whole tiny run: before / after numbers in the report, the retention Markdown and the
model card, a loss figure, and an export that stock transformers loads with the recovered model's outputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.export.hf import export_hf
from fbnprune.recipe import load_recipe
from fbnprune.recover import recover_
from fbnprune.run import run
from tests.conftest import word_tokenizer
from tests.recover.helpers import config, pair

# every test of this module gets its own fbnprune cache
pytestmark = pytest.mark.usefixtures("private_cache")


def recipe_file(env, tmp_path, **recover):
    data = {
        "name": "tiny-recover",
        "model": {"source": str(env / "model")},
        "collect": {"source": str(env / "calib.txt"), "n_tokens": 512, "seq_len": 32},
        "prune": {"method": "flap", "compensate": "bias", "sparsity": 0.5, "protected_layers": []},
        "recover": {"data": [str(env / "calib.txt")], "seq_len": 32, "batch_size": 4, "max_tokens": 4 * 32 * 15,
                    "lr": 1e-2, "warmup": 0.0, **recover},
        "evaluate": {"perplexity": [{"source": str(env / "eval.txt"), "seq_len": 32, "max_tokens": 512}],
                     "retention": {"source": str(env / "eval.txt"), "n_tokens": 256, "seq_len": 32},
                     "speed": False},
    }
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_run_reports_before_and_after_recovery(tiny_env, tmp_path):
    out = tmp_path / "out"
    report = run(load_recipe(recipe_file(tiny_env, tmp_path)), output_dir=out)
    res = report["results"]
    key = "ppl_" + str(tiny_env / "eval.txt") + "_32"
    before, after, dense = res["recovery"]["before"], res["pruned"], res["dense"]
    assert before[key]["windows"] == after[key]["windows"] == 16  # same protocol before and after
    assert after["retention"]["kl"] < 0.9 * before["retention"]["kl"]  # recovery moved it towards dense
    assert after[key]["ppl"] != before[key]["ppl"] and after["params"] < dense["params"]
    rows = {r["metric"]: r for r in res["recovery"]["rows"]}
    kl_row = rows["KL(dense‖model), nats/token"]
    assert kl_row["before"] == before["retention"]["kl"] and kl_row["after"] == after["retention"]["kl"]
    assert kl_row["gap_closed"] == pytest.approx(1 - after["retention"]["kl"] / before["retention"]["kl"], abs=1e-4)
    ppl_row = rows[f"perplexity {tiny_env / 'eval.txt'}@32"]
    assert ppl_row["dense"] == dense[key]["ppl"]
    training = report["recovery"]
    assert training["steps"] == 15 and training["tokens"] == 15 * 128 and training["stop"] == "max_tokens"
    assert len(training["curve"]) == 15 and res["recovery"]["training"]["data"] == [str(tiny_env / "calib.txt")]
    md = (out / "retention.md").read_text()
    assert "| recovery | dense | before | after | gap closed |" in md and "stopped by max_tokens" in md
    assert (out / "recovery_loss.png").stat().st_size > 1000
    card = (out / "model" / "README.md").read_text()
    assert "## Recovery" in card and "| KL(dense‖model), nats/token |" in card
    manifest = json.loads((out / "model" / "fbnprune_export.json").read_text())
    assert manifest["loader"] == "stock" and manifest["bias_layers"] == [0, 1]  # the bias compensation is kept

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fbnprune.evaluate.ppl import perplexity, token_stream

    # the exported checkpoint is the recovered model: stock transformers gives the perplexity the run measured
    stock = AutoModelForCausalLM.from_pretrained(out / "model")
    toks = token_stream(AutoTokenizer.from_pretrained(out / "model"), str(tiny_env / "eval.txt"), 512)
    assert perplexity(stock, toks, seq_len=32, progress=False)["ppl"] == pytest.approx(after[key]["ppl"], rel=1e-5)


def test_network_loss_runs_discovery_for_a_method_without_networks(tiny_env, tmp_path):
    data = yaml.safe_load(recipe_file(tiny_env, tmp_path, network_weight=1.0, max_tokens=4 * 32 * 3).read_text())
    data["collect"]["keep_activations"] = True
    data["discover"] = {"n_components": 8, "n_restarts": 2, "block_texts": None, "block_rows": 128}
    (tmp_path / "n.yaml").write_text(yaml.safe_dump(data))
    report = run(load_recipe(tmp_path / "n.yaml"), output_dir=tmp_path / "o", evaluate=False)
    assert report["networks"]["runs_ok"] >= 1  # flap needs no networks: discovery ran for the recover stage
    assert report["recovery"]["curve_columns"][4:] == ["kl", "network"]
    assert all(row[5] > 0 for row in report["recovery"]["curve"])


def test_export_command_recovers_without_evaluating(tiny_env, tmp_path):
    from fbnprune.cli import main

    out = tmp_path / "e"
    assert main(["export", str(recipe_file(tiny_env, tmp_path, max_tokens=4 * 32 * 2)), "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"] == 2 and report["results"]["recovery"]["before"] == {}
    assert "dense" not in report["results"] and (out / "model" / "config.json").is_file()
    assert main(["prune", str(recipe_file(tiny_env, tmp_path)), "-o", str(tmp_path / "p")]) == 0
    assert "recovery" not in json.loads((tmp_path / "p" / "report.json").read_text())  # a keep plan only


def test_a_source_with_too_little_text_fails_before_any_work(tiny_env, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the a of and to in is was\n")
    with pytest.raises(UserError, match=r"has 8 tokens, fewer than the 32 requested|fewer than one window"):
        run(load_recipe(recipe_file(tiny_env, tmp_path, data=[str(short)], n_tokens=None)),
            output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache" / "activations").exists()  # nothing collected


def test_recovered_export_loads_in_stock_transformers_with_equal_logits(tiny_env, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher, student = pair()  # layers 64 and 43 wide, and a down-projection bias in layer 0
    ad = get_adapter(student)
    ad.slice_(ad.mlps(student)[0], torch.arange(43))  # both layers 43 wide: a stock config describes it
    recover_(teacher, student, word_tokenizer(), config(tiny_env, lr=1e-2, max_tokens=4 * 32 * 4), progress=False)
    export_hf(student, word_tokenizer(), tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(stock).__name__ == "LlamaForCausalLM" and stock.config.intermediate_size == 43
    assert stock.config.mlp_bias  # the pair's down-projection bias, merged with the adapters, stays
    x = torch.randint(3, 30, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(stock(input_ids=x).logits, student(input_ids=x).logits, atol=1e-5)
