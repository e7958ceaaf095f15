"""The study's table generator: nominal sparsities, missing cells, and the share of the increase fbn removes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmarks import BENCHMARKS, load_script

SCRIPT = BENCHMARKS / "fbn_rules" / "leaderboard_tables.py"


@pytest.fixture(scope="module")
def tables():
    return load_script(SCRIPT, "leaderboard_tables")


def write(path: Path, rows: list[str]) -> Path:
    path.write_text("model,method,sparsity,allocation,ppl128,ppl2048,mean_acc,retention,params\n" + "\n".join(rows) + "\n")
    return path


def test_tables_and_shares(tables, tmp_path):
    csv = write(tmp_path / "summary.csv", [
        "m,dense,0.0,-,50,10,0.5,1.0,100",
        "m,fbn,0.1992,uniform,80,16,0.45,0.9,90",
        "m,wanda_sp+bias,0.1992,uniform,70,20,0.44,0.88,90",
        "m,corr_redundancy,0.4999,uniform,90,30,0.4,0.8,80",
        "m,fbn,0.3,global,1,1,1,1,1",  # not uniform: ignored
    ])
    cells = tables.load(csv)["m"]
    assert set(cells) == {("dense", 0.0), ("fbn", 0.2), ("wanda_sp+bias", 0.2), ("corr_redundancy", 0.5)}
    lines = tables.table(cells)
    assert lines[2] == "| **fbn** | 16.00 / 80.0 / 0.450 | - | - |"
    assert "| corr_redundancy | - | - | 30.00 / 90.0 / 0.400 |" in lines
    assert not any(line.startswith("| obs ") for line in lines)  # rows with no cell are left out
    read = tables.readings(cells)
    # ppl@2048: (20 - 16) / (20 - 10) = +40 % better than wanda_sp+bias; ppl@128: (70 - 80) / (70 - 50) = -50 %
    assert "20%: +40.0 % vs wanda_sp+bias" in read[0]
    assert "20%: -50.0 % vs wanda_sp+bias" in read[1]
    assert "50%: -" in read[0]
    assert tables.share(16.0, 20.0, 10.0) == pytest.approx(0.4)


def test_fbn_cells_under_the_former_rebuild_count_as_fbn(tables, tmp_path):
    csv = write(tmp_path / "summary.csv", [
        "m,dense,0.0,-,50,10,0.5,1.0,100",
        "m,fbn+corrrefit,0.3,uniform,80,16,0.45,0.9,90",
        "m,obs,0.3,uniform,70,20,0.44,0.88,90",
    ])
    cells = tables.load(csv)["m"]
    assert "| **fbn+corrrefit** | - | 16.00 / 80.0 / 0.450 | - |" in tables.table(cells)
    assert "30%: +40.0 % vs obs" in tables.readings(cells)[0]
