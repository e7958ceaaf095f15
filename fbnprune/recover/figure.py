"""The loss curve of a recovery run (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_figure(record: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Plot the total loss (and each term when there are several) against training tokens; with 40 steps or more
    a moving average over a twentieth of the steps is drawn over the per-step losses, which one batch makes noisy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    terms = record.get("loss_terms") or []
    tokens = [row[1] for row in curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    loss = [row[2] for row in curve]
    k = len(curve) // 20
    if k > 1:
        ax.plot(tokens, loss, color="0.75", linewidth=0.6, label="total, per step")
        avg = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
        ax.plot(tokens, avg, color="black", label=f"total, mean of {k} steps")
    else:
        ax.plot(tokens, loss, label="total", color="black")
    if len(terms) > 1:
        for j, name in enumerate(terms):
            ax.plot(tokens, [row[4 + j] for row in curve], label=name, linewidth=0.8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.set_title(title or f"recovery: {record.get('method', '')}, {record.get('steps', len(curve))} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
