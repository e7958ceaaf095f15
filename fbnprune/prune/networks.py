"""Functional networks as the prune stage reads them: the set a scorer works with, and who shares a network.

The ``fbn`` scorer, its ``corr_redundancy`` control and the ``netrefit``/``corrrefit`` compensations all start
from the same two questions, answered here once: which :class:`~fbnprune.discover.NetworkSet` applies to this
model (the one given, else discovered from the calibration store, cached by content), and, per layer, which
neurons share a network with which (:func:`network_neighbourhoods`).
"""

from __future__ import annotations

import torch
from pydantic import ValidationError

from fbnprune.discover import DiscoverConfig, NetworkSet, run_discovery
from fbnprune.errors import UserError
from fbnprune.prune.scorers import ScoreContext


def scoring_networks(ctx: ScoreContext, scorer: str) -> NetworkSet:
    """``ctx.networks`` (a set or its directory), else discovery on ``ctx.store`` with ``ctx.discover`` settings;
    checked against the model's layer widths."""
    nets = ctx.networks
    if nets is None:
        store = ctx.require_store(scorer)
        opts = ctx.discover or {}
        try:
            cfg = opts if isinstance(opts, DiscoverConfig) else DiscoverConfig(**dict(opts))
        except ValidationError as e:
            msgs = "; ".join(f"discover.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise UserError(f"invalid discover options: {msgs}") from None
        nets = run_discovery(store, cfg, progress=ctx.progress)
    elif not isinstance(nets, NetworkSet):
        nets = NetworkSet.load(nets)
    widths = [ctx.adapter.width(m) for m in ctx.adapter.mlps(ctx.model)]
    if nets.widths != widths:
        raise UserError(f"networks at {nets.path} were found for layer widths {nets.widths}, the model has {widths}")
    return nets


def network_neighbourhoods(nets: NetworkSet, layer: int, run: int | None = None) -> torch.Tensor:
    """Boolean ``(N, N)``: ``[p, q]`` is true when neurons p and q share a network (of ``run``, or of any run when
    ``run`` is None); the diagonal is false."""
    runs = range(nets.n_runs(layer)) if run is None else [run]
    share = torch.zeros(nets.widths[layer], nets.widths[layer], dtype=torch.bool)
    for r in runs:
        m = nets.networks(layer, r).double()  # (n_net, N)
        share |= (m.T @ m) > 0
    share.fill_diagonal_(False)
    return share
