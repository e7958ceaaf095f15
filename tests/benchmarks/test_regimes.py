"""benchmarks/fbn_rules/regimes.py on the tiny environment: calibration never touches the held-out tails, every
cell and evaluation is written once and resumed, and the summary's margins are paired by calibration seed."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from fbnprune.errors import UserError
from fbnprune.evaluate.ppl import perplexity
from tests.benchmarks import BENCHMARKS, load_script

METHODS = ("fbn", "wanda_sp-refit")


@pytest.fixture
def regimes(tmp_path, tiny_env, private_cache, monkeypatch):
    """The regimes script pointed at a tiny grid (fbn and Wanda-sp + re-fit at 25 %), the tiny eval text as the test
    set, and the tiny calibration text as the one calibration set with a held-out tail."""
    mod = load_script(BENCHMARKS / "fbn_rules" / "regimes.py", "fbn_regimes")
    grid = tmp_path / "grid" / "tiny"
    grid.mkdir(parents=True)
    calib, test = str(tiny_env / "calib.txt"), str(tiny_env / "eval.txt")
    for name, prune in (("fbn", {"method": "fbn", "compensate": "refit"}),
                        ("wanda_sp-refit", {"method": "wanda_sp", "compensate": "refit"})):
        r = {"name": f"tiny-{name}", "model": {"source": str(tiny_env / "model")},
             "collect": {"source": calib, "n_tokens": 512, "seq_len": 32, "keep_activations": True},
             "prune": {"sparsity": 0.25, "protected_layers": [], **prune}, "evaluate": None, "export": None}
        if name == "fbn":
            r["discover"] = {"n_components": 8, "n_restarts": 2, "block_texts": None, "block_rows": 64}
        (grid / f"{name}-25.yaml").write_text(yaml.safe_dump(r))
    for k, v in {"GRID": tmp_path / "grid", "OUT": tmp_path / "out" / "regimes", "HERE": tmp_path / "out",
                 "METHODS": METHODS, "TEST_SET": test, "HELD_SETS": (calib,), "HELD_OUT": 640, "EVAL_SEQ_LEN": 32,
                 "WIKITEXT_TOKENS": 512, "CALIB_SEQ_LEN": 32,
                 "LABELS": {"fbn": "fbn", "wanda_sp-refit": "Wanda-sp + re-fit"},
                 "REGIMES": {"budget": {"sources": [calib], "tokens": [64, 128], "seeds": [0, 1], "evals": [test]},
                             "domain": {"sources": [calib], "tokens": [128], "seeds": [0], "evals": [test, calib]}},
                 }.items():
        monkeypatch.setattr(mod, k, v)
    return mod, calib, test, tmp_path / "out"


def test_calibration_stays_out_of_the_held_out_tail(regimes, tiny_env):
    mod, calib, test, _ = regimes
    from transformers import AutoTokenizer

    texts = mod.Texts(AutoTokenizer.from_pretrained(tiny_env / "model"))
    ids = texts.ids(calib)
    head = len(ids) - mod.HELD_OUT
    tail = texts.evaluation(calib)
    assert torch.equal(tail.ids, ids[head:]) and len(tail) == 640
    batch = texts.calibration(calib, 256, seed=3)
    grid = {tuple(ids[s : s + 32].tolist()) for s in range(0, head - 31, 32)}
    assert all(tuple(s.tolist()) in grid for s in batch.sequences)  # every window lies before the tail
    with pytest.raises(UserError, match="fewer than"):  # the whole head, and no more, can be drawn
        texts.calibration(calib, (head // 32 + 1) * 32, seed=0)
    assert len(texts.evaluation(test)) == 512


def test_run_resume_and_summary(regimes, capsys):
    mod, calib, test, out = regimes
    mod.run("tiny", "budget", list(METHODS), 25, "1 torch thread")
    cells = sorted((out / "regimes" / "tiny").glob("*/*.json"))
    assert len(cells) == 2 * 2 * len(METHODS)
    assert {c.parent.name for c in cells} == {f"{calib.replace('/', '_')}-{t}-s{s}" for t in (64, 128) for s in (0, 1)}
    d = out / "regimes" / "tiny"
    key = calib.replace("/", "_")
    one = json.loads((d / f"{key}-64-s1" / "fbn.json").read_text())
    assert one["calib_tokens"] == 64 and one["calib_seed"] == 1 and set(one["evals"]) == {test}
    assert one["kept_widths"] == [96, 96] and one["command"]
    dense = json.loads((d / "dense.json").read_text())
    assert dense["evals"][test]["tokens_scored"] == 512 - 512 // 32  # 16 windows of 32, first token of each unscored
    # seeds give other windows, so other cells
    assert one["calib_sha256"] != json.loads((d / f"{key}-64-s0" / "fbn.json").read_text())["calib_sha256"]
    before = json.loads((d / f"{key}-128-s0" / "fbn.json").read_text())["evals"][test]
    stamps = {c: c.stat().st_mtime_ns for c in cells}
    capsys.readouterr()
    mod.run("tiny", "budget", list(METHODS), 25, "1 torch thread")  # resumable: nothing to do
    assert {c: c.stat().st_mtime_ns for c in cells} == stamps and "calibration" not in capsys.readouterr().out
    # the domain regime adds the held-out evaluation to the shared 128-token seed-0 cells only
    mod.run("tiny", "domain", list(METHODS), 25, "1 torch thread")
    shared = json.loads((d / f"{key}-128-s0" / "fbn.json").read_text())
    assert set(shared["evals"]) == {test, calib} and shared["evals"][test] == before
    # the budget run that measured the kept evaluation is still named
    assert [(e["evals"], e["command"]) for e in shared["earlier_runs"]] == [([test], one["command"])]
    assert set(json.loads((d / f"{key}-64-s0" / "fbn.json").read_text())["evals"]) == {test}  # not a domain cell
    mod.summarize()
    with (out / "calibration_regimes.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {"model", "method", "calib_source", "calib_tokens", "calib_seed", "eval_source", "ppl", "dense_ppl"} <= set(table[0])
    assert len(table) == 2 * 2 * len(METHODS) + len(METHODS)
    assert (out / "regimes.md").is_file() and (out / "regimes_budget.png").stat().st_size > 1000


def test_a_slice_runs_only_its_cells_with_one_discovery_for_the_priors(regimes, monkeypatch):
    mod, calib, test, out = regimes
    calls: list[int] = []
    real = mod.run_discovery
    monkeypatch.setattr(mod, "run_discovery", lambda *a, **k: calls.append(1) or real(*a, **k))
    methods = ["wanda_sp-refit~net:0.5", "wanda_sp-refit~rand:0.5", "wanda_sp-refit~diag:0.5"]
    mod.run("tiny", "budget", methods, 25, "1 torch thread", tokens=[128], seeds=[1])
    key = calib.replace("/", "_")
    made = sorted(f"{c.parent.name}/{c.name}" for c in (out / "regimes" / "tiny").glob("*/*.json"))
    assert made == sorted(f"{key}-128-s1/{m}.json" for m in methods)
    assert len(calls) == 1  # net and rand share the calibration's networks; diag needs none
    with pytest.raises(SystemExit, match="not in the budget regime"):
        mod.run("tiny", "budget", methods, 25, "1 torch thread", tokens=[100])


def test_margins_pair_seeds_against_the_best_baseline(regimes, monkeypatch):
    mod, *_ = regimes
    monkeypatch.setattr(mod, "METHODS", ("fbn", "b", "c"))

    def row(method, seed, inc):
        return {"model": "m", "method": method, "calib_source": "s", "calib_tokens": 256, "calib_seed": seed,
                "eval_source": "t", "increase": inc}

    # baseline b is best on average (10, 12); fbn beats it by 1 on seed 0 and loses by 1 on seed 1
    table = [row("fbn", 0, 9.0), row("fbn", 1, 13.0), row("b", 0, 10.0), row("b", 1, 12.0),
             row("c", 0, 11.0), row("c", 1, 14.0)]
    (m,) = mod.margins(table)
    assert m["best_baseline"] == "b" and m["seeds"] == 2
    assert m["fbn_vs_best"] == pytest.approx((0.1 + (-1 / 12)) / 2)
    assert m["fbn_vs_best_sd"] == pytest.approx(torch.tensor([0.1, -1 / 12]).std().item())
    assert m["means"]["c"] == pytest.approx(12.5)
    assert mod.margins([row("b", 0, 1.0), row("c", 0, 2.0)]) == []  # no fbn: nothing to compare
    assert mod.margins([*table, row("fbn~x:1", 0, 0.1)])[0]["best_baseline"] == "b"  # prior cells are not methods


def test_domain_table_places_each_pair(regimes, monkeypatch):
    """The domain pivot puts every (calibration, evaluation) margin in its own cell and leaves missing ones blank."""
    mod, *_ = regimes
    monkeypatch.setitem(mod.REGIMES, "domain", {"sources": ["a", "b"], "tokens": [8192], "seeds": [0],
                                                "evals": ["t", "x", "y"]})

    def margin(calib, tokens, ev, share):
        return {"model": "m", "calib_source": calib, "calib_tokens": tokens, "eval_source": ev,
                "fbn_vs_best": share, "best_baseline": "obs-refit"}

    md = mod.domain_table([margin("b", 8192, "y", 0.125), margin("b", 1024, "t", 0.5)])  # 1,024: not a domain cell
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")][1:]
            for line in md if line.startswith(("| a |", "| b |"))}
    assert rows == {"a": ["—", "—", "—"], "b": ["—", "—", "+12.5% (OBS)"]}
    assert "### m" not in "\n".join(mod.domain_table([margin("b", 1024, "t", 0.5)]))  # nothing at 8,192: no table


def test_dense_perplexity_is_the_protocol_number(regimes, tiny_env):
    mod, calib, test, out = regimes
    mod.run("tiny", "domain", ["wanda_sp-refit"], 25, "1 torch thread")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_env / "model").eval()
    texts = mod.Texts(AutoTokenizer.from_pretrained(tiny_env / "model"))
    dense = json.loads((out / "regimes" / "tiny" / "dense.json").read_text())
    for ev in (test, calib):
        want = perplexity(model, texts.evaluation(ev), seq_len=32, batch_size=1, progress=False)["ppl"]
        assert dense["evals"][ev]["ppl"] == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------------------------ Gram priors
@pytest.fixture
def prior_mod():
    return load_script(BENCHMARKS / "fbn_rules" / "gram_prior.py", "gram_prior")


def augmented(h: torch.Tensor) -> torch.Tensor:
    x = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)
    return x.T @ x


def test_shrink_changes_covariances_only(prior_mod):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 3.0
    G = augmented(h)
    cov = torch.cov(h.T, correction=0)
    mask = torch.eye(6, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    for kind, lam in (("net", 0.5), ("rand", 0.5), ("diag", 0.5), ("ridge", 0.1)):
        out = prior_mod.shrink(G, kind, lam, mask)
        assert torch.equal(out[6], G[6]) and torch.equal(out[:, 6], G[:, 6])  # means and count as measured
        c = out[:6, :6] / 200 - torch.outer(h.mean(0), h.mean(0))
        if kind == "ridge":
            assert torch.allclose(c, cov + 0.1 * cov.diagonal().mean() * torch.eye(6, dtype=torch.float64))
        else:
            keep = torch.eye(6, dtype=torch.bool) if kind == "diag" else mask
            assert torch.allclose(c[keep], cov[keep]) and torch.allclose(c[~keep], 0.5 * cov[~keep])
    assert torch.equal(prior_mod.shrink(G, "diag", 0.0), G)
    with pytest.raises(ValueError, match="unknown Gram prior"):
        prior_mod.shrink(G, "blocks", 0.5)


def test_recurring_mask_and_its_permuted_control(prior_mod):
    class Nets:  # two runs of one 6-neuron layer: network {0,1,2} recurs, {3,4} and {4,5} do not
        widths = [6]
        n_layers = 1

        def n_runs(self, layer):
            return 2

        def networks(self, layer, run):
            rows = [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]] if run == 0 else [[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]
            return torch.tensor(rows, dtype=torch.bool)

        def network_recurrence(self, layer):
            return torch.tensor([[1.0, 0.0], [1.0, 0.0]])

    m = prior_mod.recurring_mask(Nets(), 0)
    want = torch.eye(6, dtype=torch.bool)
    want[:3, :3] = True
    assert torch.equal(m, want)
    p = prior_mod.permuted(m, seed=1)
    assert p.sum() == m.sum() and torch.equal(p, p.T) and p.diagonal().all() and not torch.equal(p, m)
    assert prior_mod.mask_density(Nets()) == [pytest.approx(6 / 30)]


def test_overlapping_networks_become_a_partition_that_keeps_the_covariance_psd(prior_mod):
    """Recurring networks {0,1,2} (recurrence 1.0) and {2,3} and {3,4,5} (0.5) overlap; a mask of their blocks
    would not be positive semi-definite. The partition gives neuron 2 to the most recurrent network and 3 to the
    larger of the others, and a shrunk rank-deficient covariance keeps no negative eigenvalue."""
    class Nets:
        widths = [7]
        n_layers = 1

        def n_runs(self, layer):
            return 2

        def networks(self, layer, run):
            rows = ([[1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0]] if run == 0
                    else [[0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 0]])
            return torch.tensor(rows, dtype=torch.bool)

        def network_recurrence(self, layer):
            return torch.tensor([[1.0, 0.5], [0.25, 0.5]])

    groups = prior_mod.recurring_groups(Nets(), 0)
    assert groups.tolist() == [0, 0, 0, 1, 1, 1, -1]  # {1,2,3} recurs too little; neuron 6 is in no network
    m = prior_mod.recurring_mask(Nets(), 0)
    assert torch.equal(m, m.T) and m.diagonal().all() and torch.equal(m.float() @ m.float() > 0, m)  # transitive
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 7, generator=g, dtype=torch.float64)  # 5 rows: a singular covariance, as at small budgets
    overlap = torch.eye(7, dtype=torch.bool)
    for idx in ([0, 1, 2], [2, 3], [3, 4, 5]):
        overlap[torch.tensor(idx)[:, None], torch.tensor(idx)[None, :]] = True
    assert torch.linalg.eigvalsh(overlap.double()).min() < -0.1  # the blocks as found are not PSD
    for mask in (m, prior_mod.permuted(m, seed=3)):
        for lam in (0.2, 0.5, 0.8, 1.0):
            out = prior_mod.shrink(augmented(h), "net", lam, mask)
            c = out[:7, :7] / 5 - torch.outer(h.mean(0), h.mean(0))
            assert torch.linalg.eigvalsh(c).min() > -1e-12


def test_prior_is_applied_inside_the_block_only(prior_mod, tiny_env, private_cache):
    """OBS + re-fit on a tiny model: ridge 0 changes nothing, a strong diagonal prior changes the pruned weights,
    and the product's Gram function is back in place after the block."""
    import fbnprune.prune.compensate as comp
    import fbnprune.prune.obs as obs
    from benchmarks.runner import Bench
    from fbnprune.recipe.schema import Recipe

    recipe = Recipe.model_validate({
        "name": "tiny", "model": {"source": str(tiny_env / "model")},
        "collect": {"source": str(tiny_env / "calib.txt"), "n_tokens": 256, "seq_len": 32, "keep_activations": True},
        "prune": {"method": "obs", "compensate": "refit", "sparsity": 0.25, "protected_layers": []},
        "evaluate": None, "export": None})
    bench = Bench(recipe)
    original = obs.augmented_gram

    def down(r):
        return [layer.mlp.down_proj.weight.detach().clone() for layer in r.lm.model.model.layers]

    plain = down(bench.prune(recipe))
    with prior_mod.applied("ridge", 0.0):
        assert obs.augmented_gram is not original and comp.augmented_gram is obs.augmented_gram
        same = down(bench.prune(recipe))
    with prior_mod.applied("diag", 0.9):
        other = down(bench.prune(recipe))
    assert obs.augmented_gram is original and comp.augmented_gram is original
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, same, strict=True))
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(plain, other, strict=True))
    with pytest.raises(ValueError, match="needs networks"), prior_mod.applied("net", 0.5):
        pass


def test_the_recipes_gram_shrink_is_the_studys_diagonal_prior(prior_mod, tiny_env, private_cache):
    """``prune.gram_shrink`` in a recipe prunes exactly as the study's ``diag`` prior at the same strength did, so
    the regimes' numbers hold for the product option."""
    from benchmarks.runner import Bench
    from fbnprune.recipe.schema import Recipe

    def recipe(shrink):
        return Recipe.model_validate({
            "name": "tiny", "model": {"source": str(tiny_env / "model")},
            "collect": {"source": str(tiny_env / "calib.txt"), "n_tokens": 256, "seq_len": 32,
                        "keep_activations": True},
            "prune": {"method": "obs", "compensate": "refit", "sparsity": 0.25, "protected_layers": [],
                      "gram_shrink": shrink}, "evaluate": None, "export": None})

    bench = Bench(recipe(0.0))

    def down(r):
        return [layer.mlp.down_proj.weight.detach().clone() for layer in r.lm.model.model.layers]

    product = bench.prune(recipe(0.5))
    with prior_mod.applied("diag", 0.5):
        study = bench.prune(recipe(0.0))
    plain = bench.prune(recipe(0.0))
    assert all(torch.equal(a, b) for a, b in zip(product.plan.keep, study.plan.keep, strict=True))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(down(product), down(study), strict=True))
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(down(product), down(plain), strict=True))
    with pytest.raises(ValueError, match="gram_shrink"):
        recipe(1.5)


def test_prior_choice_is_made_on_validation_text(regimes):
    mod, *_ = regimes
    test, valid = mod.TEST_SET, mod.VALID_SET

    def rows(method, seed, valid_ppl, test_inc):
        base = {"model": "m", "method": method, "calib_source": "s", "calib_tokens": 256, "calib_seed": seed}
        return [{**base, "eval_source": valid, "ppl": valid_ppl, "increase": 1.0},
                {**base, "eval_source": test, "ppl": 0.0, "increase": test_inc}]

    # strength 0.8 has the better test number but the worse validation number: 0.2 must be chosen
    table = [*rows("obs-refit~net:0.2", 0, 10.0, 5.0), *rows("obs-refit~net:0.8", 0, 11.0, 1.0),
             *rows("obs-refit", 0, 12.0, 6.0), *rows("fbn", 0, 9.0, 0.5)]
    got = {c["prior"]: c for c in mod.prior_choices(table)}
    assert set(got) == {"net", "none"}
    assert got["net"]["strength"] == 0.2 and got["net"]["test_increase"] == 5.0 and got["none"]["test_increase"] == 6.0
    assert mod.parse_method("obs-refit~rand:0.5") == ("obs-refit", "rand", 0.5)
    assert mod.parse_method("fbn") == ("fbn", None, 0.0)


def test_prior_table_compares_net_with_the_best_other_and_diag_with_none(regimes):
    mod, *_ = regimes
    inc = {0: {"none": 10.0, "net": 6.0, "rand": 5.0, "diag": 4.0, "ridge": 8.0},
           1: {"none": 20.0, "net": 9.0, "rand": 7.0, "diag": 5.0, "ridge": 9.0}}
    choices = [{"model": "m", "calib_source": "s", "calib_tokens": 1024, "calib_seed": seed, "prior": k,
                "strength": 0.5, "test_increase": v} for seed, row in inc.items() for k, v in row.items()]
    line = [x for x in mod.prior_table(choices) if x.startswith("| m |")]
    assert len(line) == 1
    cells = [c.strip() for c in line[0].strip("|").split("|")]
    assert cells[:3] == ["m", "1024", "2"] and cells[3].startswith("15.00 ± 7.07")
    # net against diag (the best other): (4-6)/4 and (5-9)/5 -> -50% and -80%; diag against none: +60% and +75%
    assert cells[-2] == "-65.0% ± 21.2% vs diag" and cells[-1] == "+67.5% ± 10.6%"


def test_discovery_settings_follow_the_calibration_budget(regimes):
    """Scarce calibration gets four blocks of what there is and at most half as many components as rows."""
    mod, *_ = regimes
    from fbnprune.collect.sources import TokenBatch
    from fbnprune.recipe import load_recipe

    recipe = load_recipe(mod.GRID / "tiny" / "fbn-25.yaml")  # blocks of 64 rows, 8 components
    big = TokenBatch.build([torch.arange(32)] * 10, "x", "pack")  # 320 tokens, 310 rows past the first positions
    assert mod.discover_for(recipe, big) is recipe
    small = TokenBatch.build([torch.arange(32)] * 4, "x", "pack")  # 124 rows: four blocks of 31
    d = mod.discover_for(recipe, small).discover
    assert (d.block_rows, d.n_components) == (31, 8) and recipe.discover.block_rows == 64
    tiny = TokenBatch.build([torch.arange(16)], "x", "pack")  # 15 rows: blocks of 3, one component
    assert (mod.discover_for(recipe, tiny).discover.n_components) == 1
    plain = load_recipe(mod.GRID / "tiny" / "wanda_sp-refit-25.yaml")
    assert mod.discover_for(plain, small) is plain
