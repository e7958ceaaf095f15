"""The networks shown to a person (quickstart table and figure) say what discovery found, layer by layer."""

from __future__ import annotations

import numpy as np

from fbnprune.discover import DiscoverConfig, overview, run_discovery
from tests.discover.test_discovery import FAST


def test_table_and_figure_follow_the_discovery_summary(planted_store, tmp_path):
    store, sets = planted_store
    nets = run_discovery(store, DiscoverConfig(**FAST), root=tmp_path / "nets", progress=False)
    rows = overview.layer_rows(nets)
    assert [r["layer"] for r in rows] == [0, 1]
    for r, planted_sets in zip(rows, sets, strict=True):
        # every planted group (10 neurons) is found in every run, and on disjoint text blocks it recurs
        assert r["networks"] >= len(planted_sets)
        assert r["median_size"] >= 1
        assert r["recurring_half"] is not None and r["recurring_half"] > 0
    # the share of neurons in some network equals the union of memberships
    assert rows[0]["member_fraction"] == round(float(nets.membership[0].float().mean()), 4)
    md = overview.to_markdown(nets)
    assert md.startswith(f"{nets.summary['runs_ok']} ICA run(s) of 4 components, each on its own block of 4 texts")
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert len(table) == 2 and table[1].startswith(f"| 1 | {rows[1]['networks']:.1f} |")
    img = overview.membership_image(nets)
    assert img.shape == (2, 400) and np.isnan(img[1, 320:]).all()
    assert (img[0] > 0).sum() == int(nets.networks(0, 0).any(0).sum())
    overview.figure(nets, tmp_path / "networks.png", "planted")
    assert (tmp_path / "networks.png").stat().st_size > 5000
