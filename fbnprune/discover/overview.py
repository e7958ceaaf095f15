"""What discovery found, for a person: a per-layer table and one figure of the functional networks.

The numbers come from the discovery summary (``NetworkSet.summary["per_layer"]``), so the table, the figure and
``summary.json`` always agree. Recurrence is the fraction of the other runs (each on its own block of text) in
which a network found in one run is found again (Hungarian matching on Jaccard overlap): a network that recurs on
disjoint text is structure of the model, not of one text block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fbnprune.discover.networks import NetworkSet


def layer_rows(nets: NetworkSet) -> list[dict[str, Any]]:
    """Per layer: networks per run, their median size, the share of neurons in some network, and recurrence."""
    return [
        {
            "layer": p["layer"],
            "networks": p["networks_per_run"],
            "median_size": p["network_size_median"],
            "member_fraction": p["member_fraction"],
            "recurrence": p["network_recurrence_mean"],
            "recurring_half": p["networks_recurring_half"],
        }
        for p in nets.summary["per_layer"]
    ]


def describe(nets: NetworkSet) -> str:
    """One sentence on how the networks were found (runs, text per run, components, threshold)."""
    s, p = nets.summary, nets.summary["params"]
    block = f"{p['block_rows']:,} tokens" if p.get("block_rows") else f"{p.get('block_texts')} texts"
    return (f"{s['runs_ok']} ICA run(s) of {p['n_components']} components, each on its own block of {block}; "
            f"a neuron belongs to a network when |z| > {p['threshold']:g}")


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def to_markdown(nets: NetworkSet) -> str:
    """The per-layer table (Markdown), headed by :func:`describe`."""
    lines = [describe(nets) + ".", "",
             "| layer | networks per run | median size | neurons in a network | recurrence | recurring in half the runs |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in layer_rows(nets):
        lines.append(f"| {r['layer']} | {r['networks']:.1f} | {r['median_size']:.0f} | {r['member_fraction']:.1%} | "
                     f"{_fmt(r['recurrence'], '.2f')} | {_fmt(r['recurring_half'], '.0%')} |")
    return "\n".join(lines) + "\n"


def membership_image(nets: NetworkSet, run: int = 0) -> np.ndarray:
    """Layer x neuron: how many of one run's networks each neuron belongs to (NaN past a narrower layer's end)."""
    img = np.full((nets.n_layers, max(nets.widths)), np.nan)
    for layer in range(nets.n_layers):
        img[layer, : nets.widths[layer]] = nets.networks(layer, run).sum(0).numpy()
    return img


def figure(nets: NetworkSet, path: Path, title: str) -> None:
    """The networks of run 0 as a layer x neuron map, beside per-layer counts, sizes and recurrence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = layer_rows(nets)
    layers = [r["layer"] for r in rows]
    img = membership_image(nets)
    fig, axes = plt.subplots(1, 4, figsize=(15, 0.16 * nets.n_layers + 2.6), width_ratios=[5, 1.2, 1.2, 1.2],
                             sharey=True)
    im = axes[0].imshow(np.where(img > 0, img, np.nan), aspect="auto", interpolation="nearest", cmap="viridis")
    axes[0].set_facecolor("#f4f4f4")
    axes[0].set_xlabel("neuron index (MLP intermediate)")
    axes[0].set_ylabel("layer")
    axes[0].set_title(f"{title}: networks per neuron (run 0; grey = in none)", fontsize=9)
    fig.colorbar(im, ax=axes[0], label="networks containing the neuron", fraction=0.04)
    axes[1].barh(layers, [r["networks"] for r in rows], color="tab:blue")
    axes[1].set_xlabel("networks per run")
    axes[2].barh(layers, [r["median_size"] for r in rows], color="tab:green")
    axes[2].set_xlabel("median network size\n(neurons)")
    rec = [np.nan if r["recurrence"] is None else r["recurrence"] for r in rows]
    axes[3].barh(layers, rec, color="tab:orange")
    axes[3].set_xlim(0, 1)
    axes[3].set_xlabel("recurrence\n(share of other runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
