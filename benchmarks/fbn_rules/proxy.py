"""Cheap cross-validated proxy: per-layer relative MLP output error on HELD-OUT calibration windows, no forward pass.

The calibration store (wikitext2-valid, 16 windows of 512 tokens, seed 0) is split by window: windows 0-11 fit
everything (selection statistics, OBS, re-fits, network recurrence = runs 0-2 of the "runs4" discovery, whose
blocks are windows 0-3, 4-7, 8-11, 12-15), windows 12-15 only measure. Error of a pruned + compensated layer =
``||[H, 1] ([W, 0] - [W', b])^T||^2 / ||H W^T||^2`` on the held-out rows, from Gram matrices; reported as the mean
over the measured layers. It is what the re-fit and OBS optimise, measured on text they did not see, so it shows
over-fitting and whether networks add information that the fit-split Gram does not hold. It is a proxy: it
ignores how errors propagate through later layers (perplexity does not).

Selections (uniform width per layer unless noted): ``wanda_sp``, ``obs``, ``fbn_obs`` (beta 1 and 4, recurrence
weights), ``fbn_maxz`` (max |z| over runs 0-2). (Allocation rules cannot be judged per layer.) Compensations:
``none``, ``bias`` (FLAP mean), ``refit`` (ridge 1e-3 and 1e-1, shrinking toward zero as the engine does),
``anchored`` (ridge 0.1 and 1 shrinking toward the ORIGINAL kept columns), ``netrefit`` (each pruned neuron rebuilt
from the kept members of its networks, runs 0-2) and ``corrrefit`` (the control: the same number of kept neurons
per pruned neuron, chosen by absolute correlation instead of networks).

    nice -n 10 .venv/bin/python benchmarks/fbn_rules/proxy.py --sparsity 0.3 --layers 0,3,...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fbnprune.arch import get_adapter
from fbnprune.collect import collect, make_sequences
from fbnprune.discover import DiscoverConfig, run_discovery
from fbnprune.models import load_model
from fbnprune.prune.refit import anchored_refit, network_refit_weights, ridge_refit

sys.path.insert(0, str(Path(__file__).parent))
from run import CALIB, DISCOVER, machine  # noqa: E402
from variants import weighted_obs_order  # noqa: E402

HERE = Path(__file__).parent
FIT_RUNS = 3  # runs4 blocks 0-2 = windows 0-11


def gram(arr: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    h = torch.from_numpy(np.asarray(arr[rows], dtype=np.float32)).double()
    ha = torch.cat([h, torch.ones(len(h), 1, dtype=torch.float64)], 1)
    return ha.T @ ha


def rel_err(g: torch.Tensor, w: torch.Tensor, cand: torch.Tensor) -> float:
    full = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1)
    diff = full - cand
    return float((diff @ g @ diff.T).trace()) / float((full @ g @ full.T).trace())


def top(s: torch.Tensor, k: int) -> torch.Tensor:
    m = torch.zeros(len(s), dtype=torch.bool)
    m[torch.argsort(s, descending=True, stable=True)[:k]] = True
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--layers", default="", help="comma-separated layers (default: every third)")
    ap.add_argument("--selections", default="wanda_sp,fbn_maxz,obs,fbn_obs_b1,fbn_obs_b4")
    ap.add_argument("--obs-steps", type=int, default=10, help="OBS rounds (fewer = cheaper on a loaded machine)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model(args.model, dtype="float32")
    model, tok = lm.model.eval(), lm.tokenizer
    adapter = get_adapter(model)
    seqs = make_sequences(tok, CALIB["source"], n_tokens=CALIB["n_tokens"], seq_len=CALIB["seq_len"],
                          mode=CALIB["mode"], seed=CALIB["seed"])
    store = collect(model, seqs, model_info=lm.info, keep_activations=True, drop_first=CALIB["drop_first"])
    nets = run_discovery(store, DiscoverConfig(**DISCOVER["runs4"]), progress=False)
    seq = store.rows()[:, 0]
    fit_rows, ho_rows = np.nonzero(seq < 12)[0], np.nonzero(seq >= 12)[0]
    n_layers = len(adapter.mlps(model))
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(0, n_layers, 3))
    tau = nets.threshold
    rec = [(nets.run_scores[i][:FIT_RUNS] > tau).double().mean(0) for i in range(n_layers)]
    maxz = [nets.run_scores[i][:FIT_RUNS].double().amax(0) for i in range(n_layers)]
    widths = [adapter.width(m) for m in adapter.mlps(model)]
    k_uni = int(round(widths[0] * (1 - args.sparsity) / 8) * 8)
    dens = [float(r.mean()) for r in rec]
    rows: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for i in layers:
        arr = store.layer(i)
        gf, gh = gram(arr, fit_rows), gram(arr, ho_rows)
        w = adapter.down_weight(adapter.mlps(model)[i]).detach().double()
        n = w.shape[1]
        weights = {"obs": None, "fbn_obs_b1": 1 + rec[i], "fbn_obs_b4": 1 + 4 * rec[i]}
        sel = {}
        for k in args.selections.split(","):
            if k == "wanda_sp":
                sel[k] = top(gf.diagonal()[:n].sqrt() * w.norm(dim=0), k_uni)
            elif k == "fbn_maxz":
                sel[k] = top(maxz[i], k_uni)
            else:
                sel[k] = top(weighted_obs_order(gf, w, k_uni, weights[k], args.obs_steps), k_uni)
        m_ = nets._t[f"net_members.{i}"]
        share = torch.zeros(n, n, dtype=torch.bool)
        for r in range(min(FIT_RUNS, int(m_.shape[0]))):
            mm = nets.networks(i, r).double()
            share |= (mm.T @ mm) > 0
        share.fill_diagonal_(False)
        for name, keep_m in sel.items():
            keep = keep_m.nonzero().flatten()
            pruned = (~keep_m).nonzero().flatten()
            c = torch.zeros(w.shape[0], n + 1, dtype=torch.float64)
            c[:, keep] = w[:, keep]
            cands = {"none": c.clone()}
            c[:, n] = w[:, pruned] @ (gf[n, pruned] / gf[n, n])
            cands["bias"] = c
            for name, refit, ridges in (("refit", ridge_refit, (1e-3, 1e-1)),
                                        ("anchored", anchored_refit, (1e-1, 1.0))):  # toward zero / the originals
                for r in ridges:
                    c = torch.zeros_like(cands["none"])
                    c[:, keep], c[:, n] = refit(gf, w, keep, r)
                    cands[f"{name}{r:g}"] = c
            nw, delta, _ = network_refit_weights(gf, w, keep_m, share, 1e-3)
            c = torch.zeros_like(cands["none"])
            c[:, keep], c[:, n] = nw[:, keep], delta
            cands["netrefit"] = c
            # control without networks: each pruned neuron from its most correlated kept neurons, same counts
            d = gf.diagonal()[:n] / gf[n, n] - (gf[n, :n] / gf[n, n]) ** 2
            cov = gf[:n, :n] / gf[n, n] - torch.outer(gf[n, :n], gf[n, :n]) / gf[n, n] ** 2
            corr = (cov / torch.outer(d, d).clamp_min(1e-30).sqrt()).abs()
            corr[:, ~keep_m] = -1.0
            cshare = torch.zeros_like(share)
            for p_ in pruned.tolist():
                m_p = int((share[p_] & keep_m).sum())
                if m_p:
                    cshare[p_, torch.argsort(corr[p_], descending=True)[:m_p]] = True
            nw, delta, _ = network_refit_weights(gf, w, keep_m, cshare, 1e-3)
            c = torch.zeros_like(cands["none"])
            c[:, keep], c[:, n] = nw[:, keep], delta
            cands["corrrefit"] = c
            for cn, cand in cands.items():
                rows.setdefault(f"{name}|{cn}|heldout", []).append(rel_err(gh, w, cand))
                rows.setdefault(f"{name}|{cn}|fit", []).append(rel_err(gf, w, cand))
        print(f"layer {i} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    mean = {k: sum(v) / len(v) for k, v in rows.items()}
    out = {"network_density_fit_runs": dens, "command": "nice -n 10 .venv/bin/python benchmarks/fbn_rules/proxy.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
           "sparsity": args.sparsity, "layers": layers, "fit_windows": "0-11", "heldout_windows": "12-15",
           "discover": DISCOVER["runs4"], "fit_runs": FIT_RUNS, "obs_steps": args.obs_steps, "selections": args.selections,
           "mean_rel_error": mean, "per_layer": rows}
    path = HERE / "results" / args.model / f"proxy_{args.sparsity:g}_{args.selections.replace(',', '+')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    sels = list(dict.fromkeys(k.split("|")[0] for k in mean))
    comps = list(dict.fromkeys(k.split("|")[1] for k in mean))
    lines = [f"held-out relative layer error, sparsity {args.sparsity}, layers {layers}", "",
             "| selection | " + " | ".join(comps) + " |", "|---|" + "---|" * len(comps)]
    for s in sels:
        lines.append(f"| {s} | " + " | ".join(f"{mean[f'{s}|{c}|heldout']:.4f}" for c in comps) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
