# Diagnostic: refit with the 16 position-0 (sink) rows added to each Gram; 2,048 test tokens. Output: refit_diag2.out
import copy

import torch

from fbnprune.arch import get_adapter
from fbnprune.collect import collect, make_sequences
from fbnprune.evaluate import perplexity
from fbnprune.evaluate.ppl import token_stream
from fbnprune.models import load_model
from fbnprune.prune import ScoreContext, apply_plan_, make_plan, score_neurons
from fbnprune.prune.gram import augmented_gram, ridge_solve

lm = load_model("smollm2-135m", dtype="float32")
model, tok = lm.model.eval(), lm.tokenizer
ad = get_adapter(model)
mlps = ad.mlps(model)
calib = make_sequences(tok, "wikitext2-valid", n_tokens=8192, seq_len=512, mode="pack", seed=0)
store = collect(model, calib, model_info=lm.info, keep_activations=True, drop_first=1)
toks = token_stream(tok, "wikitext2-test", 2048)
# position-0 activations: causal, so a length-1 forward gives them exactly
h0 = {}
hooks = [
    ad.down_module(m).register_forward_pre_hook(
        lambda mod, a, i=i: h0.__setitem__(i, a[0].reshape(-1, a[0].shape[-1]).double())
    )
    for i, m in enumerate(mlps)
]
with torch.no_grad():
    model(input_ids=torch.stack([s[:1] for s in calib.sequences]))
for h in hooks:
    h.remove()
sc = score_neurons("wanda_sp", ScoreContext(model=model, adapter=ad, store=store))
plan = make_plan(sc, sparsity=0.3, model=model, adapter=ad, round_to=8)
for name, wt in [("refit+pos0", 1.0)]:
    m = copy.deepcopy(model)
    for i, mlp in enumerate(ad.mlps(m)):
        g = augmented_gram(store, i).clone()
        ha = torch.cat([h0[i], torch.ones(len(h0[i]), 1, dtype=torch.float64)], 1)
        g += wt * ha.T @ ha
        w = ad.down_weight(mlp)
        n = w.shape[1]
        keep = plan.keep[i]
        idx = torch.cat([keep, torch.tensor([n])])
        x = ridge_solve(g, g[idx, :n] @ w.detach().double().T, idx, 1e-3)
        with torch.no_grad():
            w[:, keep] = x[:-1].T.float()
        ad.add_down_bias_(mlp, x[-1])
    m.config.mlp_bias = True
    apply_plan_(m, plan, "mask")
    print(name, perplexity(m, toks, seq_len=512, progress=False)["ppl"], flush=True)
