"""Figures of the analysis (matplotlib, Agg, PNG): brain map, recurrence histogram, intervention curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fbnprune.discover.networks import NetworkSet
from fbnprune.discover.overview import membership_image


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def brain_map(nets: NetworkSet, path: Path, title: str, run: int = 0) -> None:
    """Layer x neuron image of how many of one run's networks each neuron belongs to, with members per layer.

    Neurons keep their index (no sorting), so a neuron that is a member everywhere shows as a vertical streak
    only if it recurs at the same index in different layers, which it has no reason to: look at the density.
    """
    plt = _plt()
    img = membership_image(nets, run)
    frac = [np.mean(np.nan_to_num(img[layer, : nets.widths[layer]]) > 0) for layer in range(nets.n_layers)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 0.18 * nets.n_layers + 2.2), width_ratios=[5, 1], sharey=True)
    shown = np.where(img > 0, img, np.nan)
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_facecolor("#f4f4f4")
    ax.set_xlabel("neuron index (MLP intermediate)")
    ax.set_ylabel("layer")
    ax.set_title(f"{title}: networks per neuron (run {run}; grey = in none)")
    fig.colorbar(im, ax=ax, label="networks containing the neuron", fraction=0.04)
    bx.barh(range(nets.n_layers), frac, color="tab:blue")
    bx.set_xlabel("fraction of neurons\nin some network")
    bx.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recurrence_hist(rec: dict[str, Any], path: Path, title: str) -> None:
    """Matched Jaccard overlap of networks between disjoint text blocks, observed vs neuron-shuffled chance."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8))
    bins = np.asarray(rec["hist_edges"])
    ax.hist(bins[:-1], bins=bins, weights=rec["chance_hist"], density=True, alpha=0.55,
            label="chance (neurons shuffled)", color="grey")
    ax.hist(rec["observed"], bins=bins, density=True, alpha=0.65, label="observed", color="tab:orange")
    ax.axvline(rec["match_threshold"], ls="--", c="k", lw=1, label=f"match threshold {rec['match_threshold']}")
    ax.set_xlabel("Jaccard overlap of matched networks (runs on disjoint text)")
    ax.set_ylabel("density")
    ax.set_title(f"{title}: network recurrence")
    ax.legend(fontsize=8)
    layers = [p["layer"] for p in rec["per_layer"]]
    bx.plot(layers, [p["observed_match_rate"] for p in rec["per_layer"]], "o-", c="tab:orange", label="observed")
    bx.plot(layers, [p["chance_match_rate"] for p in rec["per_layer"]], "s--", c="grey", label="chance")
    bx.set_xlabel("layer")
    bx.set_ylabel(f"fraction of networks matched (J >= {rec['match_threshold']})")
    bx.set_ylim(-0.02, 1.02)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def intervention_curves(summary: dict[str, Any], metrics: list[str], path: Path, title: str) -> None:
    """One row per experiment (mask, keep, amplify), one column per metric: networks vs random (band = min-max)."""
    plt = _plt()
    exps = [("mask", "networks zeroed per layer (top-n)"), ("keep", "networks kept per layer (top-k)"),
            ("amplify", "gain on the top networks' neurons")]
    fig, axes = plt.subplots(len(exps), len(metrics), figsize=(4.2 * len(metrics), 3.3 * len(exps)), squeeze=False)
    for i, (exp, xlabel) in enumerate(exps):
        rows = summary.get(exp) or []
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            if not rows:
                ax.set_visible(False)
                continue
            xs = [r["x"] for r in rows]
            net = [r[m]["network"] for r in rows]
            mean = [r[m]["random_mean"] for r in rows]
            lo = [r[m]["random_min"] for r in rows]
            hi = [r[m]["random_max"] for r in rows]
            ax.plot(xs, net, "o-", c="tab:red", label="network neurons")
            ax.plot(xs, mean, "s--", c="tab:blue", label="random neurons (mean)")
            ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.2, label="random (min-max over seeds)")
            base = summary["baseline"].get(m)
            if base is not None:
                ax.axhline(base, c="k", lw=1, ls=":", label="unmodified")
            if m == "ppl":
                ax.set_yscale("log")
            if exp in ("mask", "keep"):
                ax.set_xscale("log")
                frac = [r["fraction"] for r in rows]
                ax.set_xticks(xs, [f"{x}\n{f:.0%}" for x, f in zip(xs, frac, strict=True)], fontsize=7)
            ax.set_xlabel(xlabel + ("\n(share of all neurons)" if exp in ("mask", "keep") else ""), fontsize=8)
            ax.set_ylabel("perplexity" if m == "ppl" else m)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
