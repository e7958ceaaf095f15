"""Hugging Face export: stock and per-layer layouts, separate-process reloads, atomicity, card and summaries."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fbnprune.errors import UserError
from fbnprune.export import export_hf, load_pretrained
from fbnprune.export.hf import describe_export, read_manifest
from fbnprune.prune.plan import count_params
from tests.export.helpers import logits, reload_many, slim_model, tiny_tokenizer

TOL = 1e-4


# Every case is exported once; all reloads run in ONE fresh interpreter (stock cases first, before anything imports
# fbnprune), which keeps the suite fast while each model still comes only from its files on disk.
CASES = {  # name: (model_type, allocation, bias, how it must reload)
    "llama": ("llama", "uniform", False, "stock"),
    "llama-bias": ("llama", "uniform", True, "stock"),
    "gemma3": ("gemma3_text", "uniform", False, "stock"),
    "llama-per-layer": ("llama", "global", False, "fbnprune"),
    "gemma3-per-layer": ("gemma3_text", "global", False, "fbnprune"),
    "gemma3-bias": ("gemma3_text", "uniform", True, "fbnprune"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exports")
    out, jobs = {}, []
    for name, (mt, alloc, bias, how) in CASES.items():
        model, plan = slim_model(mt, alloc, bias=bias)
        d = export_hf(model, tiny_tokenizer() if how == "stock" else None, tmp / name, plan=plan)
        out[name] = {"model": model, "plan": plan, "dir": d, "expected": logits(model)}
        jobs.append((d, how))
    for name, (got, info) in zip(CASES, reload_many(jobs, tmp), strict=True):
        out[name].update(reloaded=got, info=info)
    return out


@pytest.mark.parametrize("case", ["llama", "llama-bias", "gemma3"])
def test_uniform_export_reloads_with_stock_transformers_in_fresh_process(exported, case):
    e = exported[case]
    out, plan, bias = e["dir"], e["plan"], CASES[case][2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == plan.kept_widths[0] < 128
    assert "per_layer_config" not in cfg
    assert not any(k.startswith("fbnprune_") for k in cfg)
    assert cfg.get("mlp_bias", False) is bias
    assert read_manifest(out)["loader"] == "stock"
    for f in ("model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
              "fbnprune_provenance.json", "fbnprune_networks.json"):
        assert (out / f).is_file(), f
    assert e["info"]["fbnprune_imported"] is False
    assert (e["reloaded"] - e["expected"]).abs().max().item() < TOL


@pytest.mark.parametrize("case", ["llama-per-layer", "gemma3-per-layer"])
def test_per_layer_export_reloads_with_load_pretrained_and_stock_refuses(exported, case):
    from transformers import AutoModelForCausalLM

    e = exported[case]
    out, plan = e["dir"], e["plan"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 128  # global value stays the dense width
    overrides = {int(k): v["intermediate_size"] for k, v in cfg["per_layer_config"].items()}
    assert overrides == {i: w for i, w in enumerate(plan.kept_widths) if w != 128}
    man = read_manifest(out)
    assert man["loader"] == "fbnprune" and man["layer_widths"] == plan.kept_widths

    with pytest.raises(Exception, match="per-layer attribute"):  # loud, never a wrong-shaped model
        AutoModelForCausalLM.from_pretrained(str(out))

    assert (e["reloaded"] - e["expected"]).abs().max().item() < TOL
    again = load_pretrained(out)  # in-process: widths and parameter count survive the round trip
    assert again.config.fbnprune_layer_widths == plan.kept_widths
    assert count_params(again) == count_params(e["model"])


def test_gemma3_bias_never_dropped_silently(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    e = exported["gemma3-bias"]
    model, plan, out = e["model"], e["plan"], e["dir"]
    with pytest.raises(UserError, match="no switch"):
        describe_export(model, plan=plan, require_stock=True)
    with pytest.raises(UserError):
        export_hf(model, None, tmp_path / "stock", plan=plan, require_stock=True)
    assert not (tmp_path / "stock").exists()

    man = read_manifest(out)
    assert man["loader"] == "fbnprune" and man["bias_layers"] == [0, 1]
    assert "silently drop" in man["reason"]
    with pytest.raises(Exception, match="per-layer attribute"):
        AutoModelForCausalLM.from_pretrained(str(out))
    assert (e["reloaded"] - e["expected"]).abs().max().item() < TOL
    assert "fbnprune.load_pretrained" in (out / "README.md").read_text()


def test_sharded_export_reloads(tmp_path):
    model, plan = slim_model("llama", "uniform")
    out = export_hf(model, None, tmp_path / "slim", plan=plan, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    from transformers import AutoModelForCausalLM

    got = logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval())
    assert (got - logits(model)).abs().max().item() < TOL


def test_slim_export_is_smaller_on_disk(tmp_path):
    from tests.conftest import tiny_model

    dense = tiny_model("llama")
    d = export_hf(dense, None, tmp_path / "dense")
    model, plan = slim_model("llama", "uniform", sparsity=0.5)
    s = export_hf(model, None, tmp_path / "slim", plan=plan)
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    removed = 2 * 3 * 64 * 64 * 4  # 2 layers x 3 projections x 64 neurons x 64 hidden x 4 bytes
    assert size(d) - size(s) == pytest.approx(removed, abs=4096)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch, exc):
    model, plan = slim_model("llama", "uniform")
    tok = tiny_tokenizer()

    def explode(*a, **k):
        raise exc("interrupted")

    monkeypatch.setattr(tok, "save_pretrained", explode)
    with pytest.raises(exc):
        export_hf(model, tok, tmp_path / "slim", plan=plan)
    assert list(tmp_path.iterdir()) == []  # no target, no hidden temporary directory


def test_interrupted_overwrite_keeps_previous_export(tmp_path, monkeypatch):
    model, plan = slim_model("llama", "uniform")
    out = export_hf(model, None, tmp_path / "slim", plan=plan)
    before = (out / "model.safetensors").read_bytes()
    tok = tiny_tokenizer()
    monkeypatch.setattr(tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(_Boom("x")))
    with pytest.raises(_Boom):
        export_hf(model, tok, out, plan=plan)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim"]


def test_model_card_networks_summary_and_provenance(tmp_path):
    model, plan = slim_model("llama", "uniform")
    networks = {"net0": [[0, 1, 2, 3], [4, 5]], "net1": [list(range(64)), []]}
    results = {"dense": {"params": 1000, "ppl_wikitext2_512": {"ppl": 20.0}},
               "pruned": {"params": 800, "ppl_wikitext2_512": {"ppl": 25.0},
                          "retention": {"kl": 0.12, "top1_agreement": 0.9}}}
    out = export_hf(model, None, tmp_path / "slim", plan=plan, networks=networks, results=results,
                    recipe_text="name: t\n", provenance={"seed": 7, "model": {"base_model": "org/base",
                                                                             "license": "apache-2.0"}},
                    base_model=None)
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "org/base" and front["license"] == "apache-2.0"
    assert front["library_name"] == "transformers" and "fbnprune" in front["tags"]
    assert "| perplexity `wikitext2_512` | 20.000 | 25.000 | 1.250 |" in text
    assert "90.00%" in text

    summ = json.loads((out / "fbnprune_networks.json").read_text())
    keep0 = set(plan.keep[0].tolist())
    assert summ["layers"][0]["networks"]["net0"] == {"members": 4, "kept": len(keep0 & {0, 1, 2, 3})}
    assert summ["networks"]["net1"]["kept"] == len(keep0 & set(range(64)))
    assert summ["layers"][1]["kept"] == plan.kept_widths[1] and summ["layers"][1]["dense_width"] == 128

    prov = json.loads((out / "fbnprune_provenance.json").read_text())
    assert prov["seed"] == 7
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["transformers"]
    assert (out / "fbnprune_recipe.yaml").read_text() == "name: t\n"


def test_export_accepts_run_report(tmp_path):
    model, plan = slim_model("llama", "uniform")
    report = {"results": {"dense": {"params": 10}, "pruned": {"params": 8}},
              "provenance": {"seed": 3, "model": {"sha256": "ab" * 32}},
              "calibration": {"source": "wikitext2", "sha256": "cd" * 32}}
    out = export_hf(model, None, tmp_path / "slim", extra_json={"fbnprune_keep_plan.json": plan.to_json()},
                    report=report)
    prov = json.loads((out / "fbnprune_provenance.json").read_text())
    assert prov["data_hashes"] == {"calibration:wikitext2": "cd" * 32}
    assert "cd" * 32 in (out / "README.md").read_text()
    assert json.loads((out / "fbnprune_keep_plan.json").read_text())["kept_widths"] == plan.kept_widths


def test_push_to_hub_refuses_offline_and_non_exports(tmp_path, monkeypatch):
    from fbnprune.export import push_to_hub

    model, plan = slim_model("llama", "uniform")
    out = export_hf(model, None, tmp_path / "slim", plan=plan)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline|OFFLINE"):
        push_to_hub(out, "someone/slim")
    with pytest.raises(UserError, match="not an fbnprune export"):
        push_to_hub(tmp_path, "someone/slim")
    with pytest.raises(UserError, match="user/name"):
        push_to_hub(out, "noslash")


def test_networks_from_discovered_set(tmp_path):
    """A NetworkSet-like object becomes the export's network map (union + per-layer run-0 networks)."""
    from fbnprune.export.card import networks_from_set, networks_summary

    class FakeSet:
        n_layers = 2
        membership = [torch.tensor([1, 1, 0, 0], dtype=torch.uint8), torch.tensor([0, 0, 1, 1], dtype=torch.uint8)]

        def networks(self, layer, run=0):
            return torch.tensor([[True, False, False, True], [False, False, False, False]])

    nets = networks_from_set(FakeSet())
    assert nets["union"] == [[0, 1], [2, 3]]
    assert nets["L0/net0"] == [[0, 3], []] and nets["L1/net0"] == [[], [0, 3]] and "L0/net1" not in nets
    from fbnprune.prune.plan import KeepPlan

    plan = KeepPlan(widths=[4, 4], keep=[torch.tensor([0, 2]), torch.tensor([2, 3])])
    s = networks_summary([2, 2], plan, nets)
    assert s["networks"]["union"] == {"members": 4, "kept": 3, "kept_fraction": 0.75}
    assert s["layers"][0]["networks"]["L0/net0"] == {"members": 2, "kept": 1}
