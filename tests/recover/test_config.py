"""Bad recover settings are recipe errors (one line per problem, with the dotted path), never tracebacks; defaults
resolve into the saved recipe."""

from __future__ import annotations

import pytest
import yaml

from fbnprune.cli import main
from fbnprune.errors import UserError
from fbnprune.recipe import RecipeError, load_recipe
from fbnprune.recipe.load import dump_recipe

OK = ["recover.data=[technical]"]  # the quickstart holds c4 out for its KL, so recovery trains on other text


@pytest.mark.parametrize("overrides, message", [
    (["recover.rank=0"], "recover.rank: Input should be greater than 0"),
    (["recover.max_minutes=0"], "recover.max_minutes: Input should be greater than 0"),
    (["recover.max_tokens=0"], "recover.max_tokens: Input should be greater than 0"),
    (["recover.max_minutes=null"], "give a budget: max_minutes or max_tokens"),
    (["recover.lr=0"], "recover.lr: Input should be greater than 0"),
    (["recover.lr=-0.001"], "recover.lr: Input should be greater than 0"),
    (["recover.batch_size=0"], "recover.batch_size: Input should be greater than or equal to 1"),
    (["recover.temperature=0"], "recover.temperature: Input should be greater than 0"),
    (["recover.target_modules=[gate_prj]"], "unknown target module 'gate_prj'; did you mean gate_proj"),
    (["recover.target_modules=[]"], "needs at least one module name or group"),
    (["recover.method=full", "recover.rank=8"], "rank: LoRA options, but method is 'full'"),
    (["recover.data=[wikitext2-test]"], "'wikitext2-test' is the evaluation text"),
    (["recover.data=[self]"], "data 'self' is sampled from the dense model: give n_tokens"),
    (["recover.kl_weight=0"], "every loss weight is 0"),
    (["recover.teacher_topk=64", "recover.mlp_weight=1"], "teacher_topk caches only logits"),
    (["recover.checkpoint_dir=/tmp/x"], "checkpoint_every is not"),
    (["recover.precision=float16"], "recover.precision: Input should be 'float32' or 'bfloat16'"),
    (["recover.n_tokens={cc: 100}"], "n_tokens names cc, which data does not list"),
    (["recover.n_tokens=0"], "n_tokens must be > 0"),
    (["recover.data=[self,technical]", "recover.n_tokens={technical: 1000}"], "data 'self' is sampled"),
    (["recover.unknown=1"], "recover.unknown: unknown key"),
])
def test_bad_settings_are_recipe_errors(overrides, message):
    with pytest.raises(RecipeError) as ei:
        load_recipe("quickstart", [*OK, *overrides])
    assert isinstance(ei.value, UserError)
    assert any(message in e for e in ei.value.errors), ei.value.errors


@pytest.mark.parametrize("overrides, message", [
    (["recover.data=[c4]"], "'c4' is this run's held-out text (evaluate.retention.source)"),
    (["recover.data=[wikitext2-valid]", "evaluate.perplexity=[{source: wikitext2-valid}]"],
     "'wikitext2-valid' is this run's perplexity text"),
    (["recover.data=[self]", "recover.n_tokens=4096", "recover.seed=1234", "evaluate.retention.source=self"],
     "would sample the same text as evaluate.retention"),
    (["prune.method=magnitude", "collect=null", "recover.network_weight=1"],
     "recover.network_weight > 0 needs functional networks"),
])
def test_training_text_is_never_evaluation_text(overrides, message):
    with pytest.raises(RecipeError) as ei:
        load_recipe("quickstart", [*OK, *overrides])
    assert any(message in e for e in ei.value.errors), ei.value.errors


def test_validate_reports_a_bad_setting_in_one_line(capsys):
    assert main(["validate", "quickstart", *OK, "recover.rank=-1"]) == 2
    err = capsys.readouterr().err
    assert "recover.rank: Input should be greater than 0" in err and "Traceback" not in err


def test_off_by_default_and_defaults_resolved():
    assert load_recipe("quickstart").recover is None
    r = load_recipe("quickstart", [*OK, "recover.method=full"])
    assert r.recover.lr == 1e-4 and r.recover.target_modules == ["mlp"] and r.recover.max_minutes == 15
    lora = load_recipe("quickstart", [*OK, "recover.max_tokens=65536"]).recover
    assert lora.lr == 5e-4 and lora.target_modules == ["all"] and lora.max_minutes is None  # tokens alone
    saved = yaml.safe_load(dump_recipe(r))["recover"]
    assert saved["lr"] == 1e-4 and saved["target_modules"] == ["mlp"]  # the saved recipe says what ran
    both = load_recipe("quickstart", [*OK, "recover.max_tokens=65536", "recover.max_minutes=5"]).recover
    assert (both.max_tokens, both.max_minutes) == (65536, 5)
    nets = load_recipe("quickstart", [*OK, "prune.method=obs", "recover.network_weight=0.5"])
    assert nets.recover.network_weight == 0.5  # obs finds no networks, but calibration activations are kept
