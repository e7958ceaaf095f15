"""The whole pipeline on a tiny local model and text files: every method, stage and compensation runs end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from fbnprune.cli import main
from fbnprune.recipe import load_recipe
from fbnprune.run import run


def recipe_file(env, tmp_path, speed=False, **prune):
    """A recipe for the tiny env; generation speed is off unless asked for (one case measures it, for time)."""
    data = {
        "name": "tiny",
        "model": {"source": str(env / "model")},
        "collect": {"source": str(env / "calib.txt"), "n_tokens": 512, "seq_len": 32, "keep_activations": True},
        "prune": {"method": "wanda_sp", "sparsity": 0.25, **prune},
        "evaluate": {"perplexity": [{"source": str(env / "eval.txt"), "seq_len": 32, "max_tokens": 512}],
                     "retention": {"source": str(env / "eval.txt"), "n_tokens": 128, "seq_len": 32},
                     "speed": speed},
    }
    if prune.get("method") in ("fbn", "corr_redundancy") or prune.get("compensate") in ("netrefit", "corrrefit"):
        data["discover"] = {"n_components": 8, "n_restarts": 2, "block_texts": None, "block_rows": 128}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


# every test of this module gets its own fbnprune cache
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.mark.parametrize(
    "prune",
    [
        {"method": "random"},
        {"method": "magnitude"},
        {"method": "wanda_sp", "speed": True},
        {"method": "flap", "compensate": "bias"},
        {"method": "taylor"},
        {"method": "obs", "compensate": "refit"},
        {"method": "fbn"},
        {"method": "fbn", "fbn_rule": "max_z"},
        {"method": "fbn", "fbn_rule": "recurrence", "allocation": "global"},
        {"method": "corr_redundancy"},
        {"method": "wanda_sp", "compensate": "netrefit", "protected_layers": [0]},
        {"method": "wanda_sp", "compensate": "corrrefit"},
        {"method": "wanda_sp", "compensate": "anchored"},
        {"method": "obs", "compensate": "refit", "sequential": True},
        {"method": "obs", "compensate": "refit", "sequential": True, "refit_target": "dense"},
        {"method": "fbn", "sequential": True},
        {"method": "wanda_sp", "compensate": "netrefit", "sequential": True, "protected_layers": [0]},
    ],
    ids=lambda d: "-".join(str(v) for v in d.values()),
)
def test_every_method_end_to_end(tiny_env, tmp_path, prune, monkeypatch):
    import functools

    import fbnprune.evaluate.speed as speed_mod

    # the run's own protocol (64 tokens, 4 repeats per model) took ~20 s here (tiny model, two threads, two busy cores)
    monkeypatch.setattr(speed_mod, "paired_generation_speed",
                        functools.partial(speed_mod.paired_generation_speed, new_tokens=8, repeats=2))
    out = tmp_path / "out"
    report = run(load_recipe(recipe_file(tiny_env, tmp_path, **prune)), output_dir=out)
    speed = prune.pop("speed", False)
    res = report["results"]
    key = "ppl_" + str(tiny_env / "eval.txt") + "_32"
    assert res["dense"][key]["windows"] == 16 and res["pruned"][key]["tokens_scored"] == 16 * 31
    assert res["pruned"]["params"] < res["dense"]["params"]
    assert res["pruned"][key]["ppl"] != res["dense"][key]["ppl"]
    assert 0 <= res["pruned"]["retention"]["kl"] and 0 <= res["pruned"]["retention"]["top1_agreement"] <= 1
    plan = json.loads((out / "keep_plan.json").read_text())
    assert abs(plan["sparsity"] - 0.25) < 0.07
    if prune.get("sequential"):  # per-layer errors against the dense model, measured on the calibration text
        seq = report["sequential"]
        whole = [w == 128 for w in plan["kept_widths"]]  # protected layer 0 is exact; a pruned layer is not
        assert (seq["mlp_error"][0] == 0) == whole[0] and all(e > 0 for e, k in zip(seq["mlp_error"], whole, strict=True) if not k)
        assert plan["info"]["sequential"] and plan["info"]["method"] == prune["method"]
    manifest = json.loads((out / "model" / "fbnprune_export.json").read_text())
    uniform = len(set(plan["kept_widths"])) == 1  # protected layers keep their width: non-uniform
    if "protected_layers" in prune:
        protected = prune["protected_layers"]
    else:  # the default 'auto' measured them and says which and why
        evidence = report["protected_layers"]
        protected = evidence["protected"]
        assert len(evidence["delta"]) == 2 and protected == sorted(protected)
    assert all(plan["kept_widths"][i] == 128 for i in protected)
    assert uniform == (prune.get("allocation", "uniform") == "uniform" and not protected)
    assert manifest["loader"] == ("stock" if uniform else "fbnprune")
    assert (out / "model" / "README.md").read_text().startswith("---")  # model card with front matter
    models = report["retention"]["models"]
    if speed:  # one measurement of both models, in alternation, after pruning
        vs = res["pruned"]["stats"]["generation"]["vs_dense"]
        assert vs["order"] == ["dense", "pruned", "pruned", "dense"]
        assert res["dense"]["stats"]["generation"]["new_tokens"] == 8 and vs["wall_ratio"] > 0
        assert models["speedup"] == vs["speedup"] and (vs["speedup"] is None) == vs["busy"]
        assert "timed in alternation" in (out / "retention.md").read_text()
    else:
        assert "generation" not in res["pruned"]["stats"] and "speedup" not in models
    from transformers import AutoTokenizer

    from fbnprune import load_pretrained
    from fbnprune.evaluate.ppl import perplexity, token_stream

    # the exported checkpoint is the evaluated model: same perplexity after reloading
    reloaded = load_pretrained(out / "model")
    toks = token_stream(AutoTokenizer.from_pretrained(out / "model"), str(tiny_env / "eval.txt"), 512)
    again = perplexity(reloaded, toks, seq_len=32, progress=False)["ppl"]
    assert again == pytest.approx(res["pruned"][key]["ppl"], rel=1e-5)


def test_default_protection_needs_no_calibration_data(tiny_env, tmp_path):
    """Without a collect section the default 'auto' protects nothing (and says so); asked for explicitly, it errors."""
    data = yaml.safe_load(recipe_file(tiny_env, tmp_path, method="magnitude").read_text())
    data["collect"] = None
    data["evaluate"]["retention"] = None
    (tmp_path / "nc.yaml").write_text(yaml.safe_dump(data))
    report = run(load_recipe(tmp_path / "nc.yaml"), output_dir=tmp_path / "o1")
    assert any("no protected layers" in n for n in report["notes"])
    assert len(set(report["results"]["plan"]["kept_widths"])) == 1
    data["prune"]["protected_layers"] = "auto"
    (tmp_path / "nc.yaml").write_text(yaml.safe_dump(data))
    from fbnprune.errors import UserError

    with pytest.raises(UserError, match="needs calibration data"):
        run(load_recipe(tmp_path / "nc.yaml"), output_dir=tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def test_stage_commands_reuse_caches(tiny_env, tmp_path, capsys):
    rf = recipe_file(tiny_env, tmp_path, method="fbn")
    assert main(["collect", str(rf)]) == 0
    store = capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1]
    from fbnprune.collect.store import ActivationStore

    rows = ActivationStore(store).rows()
    assert (rows[:, 1] == 0).any()  # recipes keep the attention-sink position for scores and re-fits
    assert main(["discover", str(rf)]) == 0
    nets = capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1]
    summary = json.loads(next(p for p in (tmp_path / "cache" / "networks").rglob("*.json")
                              if "summary" in p.name).read_text())
    assert summary["split"]["skipped_first"] == 1  # ... and discovery leaves it out
    def cached():
        return sorted(str(p.relative_to(tmp_path)) for sub in ("activations", "networks")
                      for p in (tmp_path / "cache" / sub).iterdir())

    before = cached()
    assert len(before) == 2
    out = tmp_path / "p"
    assert main(["prune", str(rf), "prune.sparsity=0.5", "-o", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "keep_plan.json").read_text())["sparsity"] == pytest.approx(0.5, abs=0.07)
    rep = json.loads((out / "report.json").read_text())
    assert rep["networks"]["path"] == nets  # scored with the networks the discover command cached
    assert rep["protected_layers"]["protected"] == []  # 50% of two layers: neither can stay whole (auto gives way)
    assert not (out / "model").exists()  # prune stage writes the plan, not a checkpoint
    assert any(store.endswith(c) for c in before) and any(nets.endswith(c) for c in before)
    assert cached() == before  # another sparsity: nothing new collected or discovered
    # the same command again: refused before any compute, the first plan kept; replaced with --overwrite
    assert main(["prune", str(rf), "prune.sparsity=0.3", "-o", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert json.loads((out / "keep_plan.json").read_text())["sparsity"] == pytest.approx(0.5, abs=0.07)
    assert main(["prune", str(rf), "prune.sparsity=0.3", "-o", str(out), "--overwrite"]) == 0
    assert json.loads((out / "keep_plan.json").read_text())["sparsity"] == pytest.approx(0.3, abs=0.07)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or old directory
    assert main(["export", str(rf), "-o", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "model" / "config.json").is_file()
    assert "dense" not in json.loads((tmp_path / "e" / "report.json").read_text()).get("results", {})
