"""Every scorer end to end on the real SmolLM2-135M (short: 2 calibration windows, 2 evaluation windows).

Layer 0 is protected: on SmolLM2 its MLP is where the massive activations come from, and a data-free scorer
(random, magnitude) that prunes 30 % of it raises the perplexity by a factor of ~50 by itself.
"""

from __future__ import annotations

import copy

import pytest

from fbnprune.arch import get_adapter
from fbnprune.collect import capture_activations, make_sequences
from fbnprune.evaluate import perplexity
from fbnprune.evaluate.ppl import token_stream
from fbnprune.prune import ScoreContext, apply_plan_, count_params, make_plan, score_neurons
from fbnprune.prune.compensate import compensate_
from fbnprune.prune.gram import clear_gram_cache
from tests.conftest import require_builtin, require_data

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fbnprune.models import load_model

    require_builtin("smollm2-135m")
    require_data()
    lm = load_model("smollm2-135m")
    calib = make_sequences(lm.tokenizer, "wikitext2-valid", n_tokens=256, seq_len=128, seed=0)
    toks = token_stream(lm.tokenizer, "wikitext2-test", 512)
    store = capture_activations(lm.model, calib, tmp_path_factory.mktemp("s") / "store", progress=False)
    dense = perplexity(lm.model, toks, seq_len=256, progress=False)["ppl"]
    return lm.model, calib, store, toks, dense


# Measured (2-core CPU, torch 2.13): dense 21.117; pruned / dense = random 4.18, magnitude 21.96, wanda_sp 1.401,
# flap 1.406, taylor 1.419, obs 1.475. The bounds sit about 10% above, so a data-aware scorer that picked neurons
# no better than random pruning (4.2x), or a data-free one that got worse, fails.
DENSE_PPL = 21.117
MAX_RATIO = {"random": 4.6, "magnitude": 24.0, "wanda_sp": 1.55, "flap": 1.55, "taylor": 1.56, "obs": 1.62}


@pytest.mark.parametrize("method", ["random", "magnitude", "wanda_sp", "flap", "taylor", "obs"])
def test_scorer_end_to_end_on_smollm2(setup, method):
    clear_gram_cache()
    model, calib, store, toks, dense = setup
    ad = get_adapter(model)
    ctx = ScoreContext(model=model, adapter=ad, store=store, sequences=calib.sequences,
                       sparsity=0.3, obs_steps=2)
    scores = score_neurons(method, ctx)
    plan = make_plan(scores, sparsity=0.3, model=model, adapter=ad, protected=[0])
    # 0.3 * 46080 = 13824 neurons from 29 layers = 476.7 each -> 480 (nearest multiple of 8): 1056 kept
    assert plan.kept_widths == [1536] + [1056] * 29 and plan.n_removed == 29 * 480
    m = copy.deepcopy(model)
    # bias for every scorer: with 254 calibration rows a re-fit of 1,536 columns is under-determined (it has its
    # own tests in test_compensate.py, and docs/fbn-study.md measures how it generalises)
    compensate_(m, plan, store, "bias")
    apply_plan_(m, plan, "slice")
    assert m.config.fbnprune_layer_widths == plan.kept_widths and m.config.mlp_bias is True
    # 480 neurons x (gate row + up row + down column) removed per layer; mlp_bias adds gate/up/down biases
    biases = 2 * 1536 + 576 + 29 * (2 * 1056 + 576)
    assert count_params(m) == count_params(model) - 29 * 480 * 3 * 576 + biases
    ppl = perplexity(m, toks, seq_len=256, progress=False)["ppl"]
    assert dense == pytest.approx(DENSE_PPL, rel=0.01)
    assert dense < ppl < MAX_RATIO[method] * dense, (method, ppl / dense)
