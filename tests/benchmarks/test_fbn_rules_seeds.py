"""The study's calibration-seed table: paired margins against fbn, their spread and how often a rule wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "fbn_rules" / "summarize.py"


@pytest.fixture(scope="module")
def summarize():
    return load_script(SCRIPT, "fbn_rules_summarize")


def put(d: Path, seed: int, variant: str, ppl: float, sparsity: float = 0.3) -> None:
    d.mkdir(parents=True, exist_ok=True)
    cell = {"variant": variant, "sparsity": sparsity, "compensate": "refit", "ppl": ppl,
            "protocol": {"calibration": {"seed": seed, "drop_first": 0}}}
    (d / f"{variant}__{sparsity:g}__refit.json").write_text(json.dumps(cell))


def test_seed_table_paired_margins(summarize, tmp_path):
    m = tmp_path / "m"
    for seed, d in [(0, m / "ppl8192_drop0"), (1, m / "ppl8192_drop0_seed1"), (2, m / "ppl8192_drop0_seed2")]:
        put(d, seed, "fbn_redundancy", 40.0 + seed)
        put(d, seed, "obs", 39.0 + seed * 1.5)  # margins -1.0, -0.5, 0.0: mean -0.5, sd 0.5, better twice
        put(d, seed, "wanda_sp", 42.0 + seed)  # +2 at every seed: sd 0
    put(m / "ppl8192_drop0", 0, "flap", 45.0)  # one seed only: not in the table
    lines = summarize.seed_table(m)
    assert lines[0].startswith("### m: calibration seeds 0, 1, 2")
    assert lines[2] == "| seed | wanda_sp 30% refit | obs 30% refit | fbn_redundancy 30% refit |"
    assert "| 1 | 43.00 | 40.50 | 41.00 |" in lines
    assert any("against `fbn_redundancy 30% refit`" in ln for ln in lines)
    assert "| obs 30% refit | -0.50 | 0.50 | 0.29 | 2 of 3 |" in lines
    assert "| wanda_sp 30% refit | +2.00 | 0.00 | 0.00 | 0 of 3 |" in lines
    assert not any("flap" in ln for ln in lines)


def test_seed_table_needs_two_seeds(summarize, tmp_path):
    put(tmp_path / "m" / "ppl8192_drop0", 0, "fbn_redundancy", 40.0)
    put(tmp_path / "m" / "ppl8192_drop0", 0, "obs", 39.0)
    assert summarize.seed_table(tmp_path / "m") == []


def test_table_columns_in_a_fixed_compensation_order(summarize, tmp_path):
    # the columns came from a set ordered only by "none first", so the rest moved with the process's string hash
    d = tmp_path / "m" / "ppl8192"
    d.mkdir(parents=True)
    for comp in ["corrrefit", "anchored", "refit", "bias", "none", "netrefit", "zeta"]:
        cell = {"variant": "wanda_sp", "sparsity": 0.3, "compensate": comp, "ppl": 40.0, "command": "run.py",
                "machine": {"platform": "p", "cpus": 2, "torch": "t", "loadavg": [0], "note": "n"},
                "protocol": {"model": "m", "eval_tokens": 8192, "calibration": {"seed": 0, "drop_first": 1}}}
        (d / f"wanda_sp__0.3__{comp}.json").write_text(json.dumps(cell))
    head = next(ln for ln in summarize.table(d) if ln.startswith("| variant |"))
    assert head == ("| variant | 30% none | 30% bias | 30% refit | 30% netrefit | 30% corrrefit | 30% anchored | "
                    "30% zeta |")
