"""Architecture adapters: where each model family keeps its MLP, as data keyed by ``config.model_type``.

Adding an architecture is one :class:`MLPAdapter` entry in :mod:`fbnprune.arch.adapters` (see
``docs/adding-an-architecture.md``).
"""

from __future__ import annotations

from fbnprune.arch import adapters as _adapters  # noqa: F401  (registers the built-in adapters)
from fbnprune.arch.base import ADAPTERS, MLPAdapter, get_adapter

__all__ = ["ADAPTERS", "MLPAdapter", "get_adapter"]
