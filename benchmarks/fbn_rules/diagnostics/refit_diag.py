# Diagnostic (run once, 2026-11-28, shared 2-core machine, load ~15): wanda_sp 30 %, none/bias/refit, 2,048 test tokens. Output: refit_diag.out
import copy

from fbnprune.arch import get_adapter
from fbnprune.collect import collect, make_sequences
from fbnprune.evaluate import perplexity
from fbnprune.evaluate.ppl import token_stream
from fbnprune.models import load_model
from fbnprune.prune import ScoreContext, apply_plan_, make_plan, score_neurons
from fbnprune.prune.compensate import compensate_

lm = load_model("smollm2-135m", dtype="float32")
model, tok = lm.model.eval(), lm.tokenizer
ad = get_adapter(model)
calib = make_sequences(tok, "wikitext2-valid", n_tokens=8192, seq_len=512, mode="pack", seed=0)
store = collect(model, calib, model_info=lm.info, keep_activations=True, drop_first=1)
toks = token_stream(tok, "wikitext2-test", 2048)
print("dense", perplexity(model, toks, seq_len=512, progress=False)["ppl"], flush=True)
sc = score_neurons("wanda_sp", ScoreContext(model=model, adapter=ad, store=store))
plan = make_plan(sc, sparsity=0.3, model=model, adapter=ad, round_to=8)
for cp in ["none", "bias", "refit"]:
    m = copy.deepcopy(model)
    compensate_(m, plan, store, cp)
    apply_plan_(m, plan, "mask")
    print(cp, perplexity(m, toks, seq_len=512, progress=False)["ppl"], flush=True)
    if cp == "refit":
        mm = m.model.layers[0].mlp
        print(
            type(mm.down_proj),
            mm.down_proj.bias is not None,
            getattr(mm.gate_proj, "bias", None) is not None,
            m.config.mlp_bias,
        )
