"""The loss curve of a recovery run (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loss_figure(record: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Plot the total loss (and each weighted term when there are several) against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    terms = record.get("loss_terms") or []
    tokens = [row[1] for row in curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(tokens, [row[2] for row in curve], label="total", color="black")
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
