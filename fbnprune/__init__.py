"""fbnprune: structured pruning of LLM MLP neurons guided by functional brain-like networks.

Stages (one sub-package each): ``models``/``arch`` (sources and adapters), ``collect`` (activations),
``discover`` (ICA networks), ``prune`` (scores, keep plans, surgery), ``evaluate`` and ``export``.
``run.py`` chains them; ``cli`` drives them from YAML recipes.
"""

from __future__ import annotations

from fbnprune._version import __version__

__all__ = ["__version__", "load_pretrained"]


def load_pretrained(path: str, **kwargs):  # noqa: ANN201 - thin lazy re-export
    """Load an fbnprune export (uniform or per-layer widths). See :func:`fbnprune.export.load_pretrained`.

    Imported on call: ``import fbnprune`` (which every submodule import runs first) stays free of torch and
    transformers.
    """
    from fbnprune.export import load_pretrained as _load

    return _load(path, **kwargs)
