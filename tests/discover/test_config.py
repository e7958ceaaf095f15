"""Parameter validation: clear errors, once."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from fbnprune.discover import CanICA, DiscoverConfig, TemporalICA
from fbnprune.errors import UserError


@pytest.mark.parametrize(
    "kw,field",
    [({"threshold": 0}, "threshold"), ({"threshold": -1.0}, "threshold"), ({"n_components": 0}, "n_components"),
     ({"n_restarts": 0}, "n_restarts"), ({"fun": "tanh"}, "fun"), ({"backend": "jax"}, "backend"),
     ({"window": 0}, "window"), ({"bogus": 1}, "bogus")],
)
def test_config_rejects_bad_values(kw, field):
    with pytest.raises(ValidationError, match=field):
        DiscoverConfig(**kw)


def test_block_size_is_one_or_the_other():
    assert DiscoverConfig(block_rows=500).block_texts is None
    with pytest.raises(ValidationError, match="not both"):
        DiscoverConfig(block_texts=10, block_rows=500)


@pytest.mark.parametrize("cls", [CanICA, TemporalICA])
def test_estimators_check_components_against_data(cls):
    x = np.random.default_rng(0).laplace(size=(50, 30))
    with pytest.raises(UserError, match=r"larger than the neurons \(30\) or tokens \(50\)"):
        cls(n_components=40).fit(x)
    with pytest.raises(UserError, match="larger than the neurons"):
        cls(n_components=60).fit(x.T[:, :20])


def test_estimators_check_parameters_and_input():
    x = np.random.default_rng(0).laplace(size=(50, 30))
    with pytest.raises(UserError, match="n_restarts"):
        CanICA(n_components=4, n_restarts=0).fit(x)
    m = CanICA(n_components=4, n_restarts=1).fit(x)
    with pytest.raises(UserError, match="threshold must be > 0"):
        m.networks(0.0)
    with pytest.raises(UserError, match="2-D"):
        CanICA(n_components=4).fit(x[0])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        CanICA(n_components=4).fit(bad)
    with pytest.raises(RuntimeError, match="not fitted"):
        _ = CanICA().scores_
