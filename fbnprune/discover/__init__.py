"""Discover stage: functional networks of MLP neurons by ICA, with runs over disjoint text blocks and recurrence.

Entry point: :func:`run_discovery` (cached) -> :class:`NetworkSet`. Single-matrix estimators with a scikit-learn
shape: :class:`CanICA` (spatial, the pruning paper) and :class:`TemporalICA` (the first paper). See
``docs/discovery.md``.
"""

from __future__ import annotations

from fbnprune.discover.config import DiscoverConfig
from fbnprune.discover.discovery import cache_key, discover_networks, run_discovery
from fbnprune.discover.estimators import CanICA, TemporalICA
from fbnprune.discover.networks import NetworkSet, jaccard_matrix, match_networks

__all__ = [
    "CanICA",
    "DiscoverConfig",
    "NetworkSet",
    "TemporalICA",
    "cache_key",
    "discover_networks",
    "jaccard_matrix",
    "match_networks",
    "run_discovery",
]
