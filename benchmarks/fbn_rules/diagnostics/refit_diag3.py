# Diagnostic: held-out (windows 12-15) vs fit (0-11) layer error for none/bias/refit at ridges 1e-3, 0.1, 1; and pruning only layer 10. Output: refit_diag3.out
import copy

import numpy as np
import torch

from fbnprune.arch import get_adapter
from fbnprune.collect import collect, make_sequences
from fbnprune.evaluate import perplexity
from fbnprune.evaluate.ppl import token_stream
from fbnprune.models import load_model
from fbnprune.prune import KeepPlan, ScoreContext, apply_plan_, make_plan, score_neurons
from fbnprune.prune.compensate import compensate_
from fbnprune.prune.gram import ridge_solve

lm = load_model("smollm2-135m", dtype="float32")
model, tok = lm.model.eval(), lm.tokenizer
ad = get_adapter(model)
mlps = ad.mlps(model)
calib = make_sequences(tok, "wikitext2-valid", n_tokens=8192, seq_len=512, mode="pack", seed=0)
store = collect(model, calib, model_info=lm.info, keep_activations=True, drop_first=1)
seq = store.rows()[:, 0]
fit, ho = np.nonzero(seq < 12)[0], np.nonzero(seq >= 12)[0]


def gram(a, r):
    h = torch.from_numpy(np.asarray(a[r], dtype=np.float32)).double()
    ha = torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], 1)
    return ha.T @ ha


def err(g, w, c):
    f = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1)
    d = f - c
    return float((d @ g @ d.T).trace() / (f @ g @ f.T).trace())


sc = score_neurons("wanda_sp", ScoreContext(model=model, adapter=ad, store=store))
plan = make_plan(sc, sparsity=0.3, model=model, adapter=ad, round_to=8)
for i in [2, 10, 20, 28]:
    a = store.layer(i)
    gf, gh = gram(a, fit), gram(a, ho)
    w = ad.down_weight(mlps[i]).detach().double()
    n = w.shape[1]
    keep = plan.keep[i]
    pr = plan.pruned(i)
    c = torch.zeros(w.shape[0], n + 1, dtype=torch.float64)
    c[:, keep] = w[:, keep]
    e_none = (err(gf, w, c), err(gh, w, c))
    c[:, n] = w[:, pr] @ (gf[n, pr] / gf[n, n])
    e_bias = (err(gf, w, c), err(gh, w, c))
    out = []
    for r in (1e-3, 1e-1, 1.0):
        idx = torch.cat([keep, torch.tensor([n])])
        x = ridge_solve(gf, gf[idx, :n] @ w.T, idx, r)
        c = torch.zeros_like(c)
        c[:, keep] = x[:-1].T
        c[:, n] = x[-1]
        out.append((r, err(gf, w, c), err(gh, w, c)))
    print(i, "none", e_none, "bias", e_bias, "refit", out, flush=True)
toks = token_stream(tok, "wikitext2-test", 2048)
for L in [10]:
    keepl = [torch.arange(n) if j != L else plan.keep[j] for j in range(len(mlps))]
    p1 = KeepPlan(widths=plan.widths, keep=keepl) if True else None
    for cp in ["none", "refit"]:
        m = copy.deepcopy(model)
        compensate_(m, p1, store, cp, progress=False) if cp == "refit" else None
        apply_plan_(m, p1, "mask")
        print("only layer", L, cp, perplexity(m, toks, seq_len=512, progress=False)["ppl"], flush=True)
