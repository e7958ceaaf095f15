"""Cheap proxy for the study: per-layer relative MLP output error on HELD-OUT activations, no perplexity runs.

For a selection (``--scorer``, uniform ``--sparsity``) on the calibration store (wikitext2-valid, 8192 tokens,
seed 0), compare compensations by the error they leave on a second store (wikitext2-valid, 8192 tokens, seed 1):
``none``, ``bias`` (FLAP mean), global ``refit`` at several ridges, and the network-restricted re-fit
(:func:`fbnprune.prune.fbn_variants.network_refit_weights`). The global re-fit is the least-squares optimum on
the calibration rows; the question is how much of its gain survives on other text (over-fitting), and whether
restricting it to functional networks loses less there. Error = ``||H (W - W')^T - 1 b^T||^2 / ||H W^T||^2``
per layer, from Gram matrices, averaged over layers.

    nice -n 10 .venv/bin/python benchmarks/fbn_rules/proxy.py --scorer obs --sparsity 0.3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fbnprune.arch import get_adapter
from fbnprune.collect import collect, make_sequences
from fbnprune.discover import DiscoverConfig, run_discovery
from fbnprune.models import load_model
from fbnprune.prune import ScoreContext, make_plan, score_neurons
from fbnprune.prune.fbn_variants import network_neighbourhoods, network_refit_weights
from fbnprune.prune.gram import augmented_gram, ridge_solve

sys.path.insert(0, str(Path(__file__).parent))
from run import CALIB, DISCOVER, machine  # noqa: E402

HERE = Path(__file__).parent


def rel_err(g: torch.Tensor, w: torch.Tensor, cand: torch.Tensor) -> float:
    """``cand``: (d, N+1) candidate [W', b] (zeros at pruned columns); ``w``: (d, N) dense weight."""
    full = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1)
    diff = full - cand
    return float((diff @ g @ diff.T).trace()) / float((full @ g @ full.T).trace())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scorer", default="obs")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--ridges", default="1e-4,1e-3,1e-2,1e-1")
    ap.add_argument("--discover", default="runs4")
    args = ap.parse_args()
    lm = load_model(args.model, dtype="float32")
    model, tok = lm.model.eval(), lm.tokenizer
    adapter = get_adapter(model)
    stores = {}
    for name, seed in (("calib", CALIB["seed"]), ("heldout", 1)):
        seqs = make_sequences(tok, CALIB["source"], n_tokens=CALIB["n_tokens"], seq_len=CALIB["seq_len"],
                              mode=CALIB["mode"], seed=seed)
        stores[name] = collect(model, seqs, model_info=lm.info, keep_activations=True, drop_first=CALIB["drop_first"])
    store = stores["calib"]
    nets = run_discovery(store, DiscoverConfig(**DISCOVER[args.discover]), progress=False)
    ctx = ScoreContext(model=model, adapter=adapter, store=store, seed=0,
                       options={"sparsity": args.sparsity, "progress": False, "networks": nets})
    plan = make_plan(score_neurons(args.scorer, ctx), sparsity=args.sparsity, round_to=8)
    ridges = [float(r) for r in args.ridges.split(",")]
    rows: dict[str, dict[str, list[float]]] = {}

    def add(name: str, split: str, v: float) -> None:
        rows.setdefault(name, {}).setdefault(split, []).append(v)

    for i, m in enumerate(adapter.mlps(model)):
        w = adapter.down_weight(m).detach().double()
        n = w.shape[1]
        keep = plan.keep[i]
        gc, gh = augmented_gram(store, i), augmented_gram(stores["heldout"], i)
        cands: dict[str, torch.Tensor] = {}
        c = torch.zeros(w.shape[0], n + 1, dtype=torch.float64)
        c[:, keep] = w[:, keep]
        cands["none"] = c.clone()
        pruned = plan.pruned(i)
        c[:, n] = w[:, pruned] @ (gc[n, pruned] / gc[n, n])
        cands["bias"] = c
        idx = torch.cat([keep, torch.tensor([n])])
        for r in ridges:
            x = ridge_solve(gc, gc[idx, :n] @ w.T, idx, r)
            c = torch.zeros_like(cands["none"])
            c[:, keep], c[:, n] = x[:-1].T, x[-1]
            cands[f"refit r={r:g}"] = c
        share = network_neighbourhoods(nets, i)
        for r in (1e-3, 1e-1):
            nw, delta, alone = network_refit_weights(gc, w, plan.keep_mask(i), share, r)
            c = torch.zeros_like(cands["none"])
            c[:, keep], c[:, n] = nw[:, keep], delta
            cands[f"netrefit r={r:g}"] = c
        add("netrefit alone fraction", "calib", alone / max(len(pruned), 1))
        for name, cand in cands.items():
            add(name, "calib", rel_err(gc, w, cand))
            add(name, "heldout", rel_err(gh, w, cand))
    out = {"command": "nice -n 10 .venv/bin/python benchmarks/fbn_rules/proxy.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
           "scorer": args.scorer, "sparsity": args.sparsity, "discover": DISCOVER[args.discover],
           "mean_rel_error": {k: {s: sum(v) / len(v) for s, v in d.items()} for k, d in rows.items()},
           "per_layer": rows}
    path = HERE / "results" / args.model / f"proxy_{args.scorer}_{args.sparsity:g}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    for k, d in out["mean_rel_error"].items():
        print(f"{k:28s} " + "  ".join(f"{s} {v:.4f}" for s, v in d.items()))


if __name__ == "__main__":
    main()
