"""fbnprune: structured pruning of LLM MLP neurons guided by functional brain-like networks.

Stages (one sub-package each): ``models``/``arch`` (sources and adapters), ``collect`` (activations),
``discover`` (ICA networks), ``prune`` (scores, keep plans, surgery), ``evaluate`` and ``export``.
``run.py`` chains them; ``cli`` drives them from YAML recipes.
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path: str, **kwargs):  # noqa: ANN201 - thin lazy re-export
    """Load an fbnprune export (uniform or per-layer widths). See :func:`fbnprune.export.load_pretrained`."""
    from fbnprune.export import load_pretrained as _load

    return _load(path, **kwargs)
