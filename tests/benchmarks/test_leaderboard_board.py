"""The leaderboard builder: exact CSV columns, retention vs dense, Markdown and plots from cell JSONs."""

from __future__ import annotations

import csv
import json
import re
import shutil

import pytest

from tests.benchmarks import BENCHMARKS, load_script

BOARD = BENCHMARKS / "leaderboard"


def cell(name, method, sparsity, accs, ppl, params, compensate="none", allocation="uniform", fbn_rule=None):
    tasks = {t: {"acc": a, "acc_norm": a} for t, a in zip(
        ["piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa"], accs, strict=True)}
    return {"run_info": {"cell": name, "method": method, "sparsity": sparsity, "allocation": allocation,
                         "compensate": compensate, **({"fbn_rule": fbn_rule} if fbn_rule else {})},
            "eval_info": {"ppl128": {"ppl": ppl}, "ppl2048": {"ppl": ppl * 0.8}, "tasks": {"tasks": tasks},
                          "params": params},
            "meta_info": {"seconds": 1.0, "command": "python run.py", "machine": {"cpu": "x", "cores": 2,
                                                                                  "loadavg": [0, 0, 0]}}}


@pytest.fixture
def board(tmp_path):
    d = tmp_path / "leaderboard"
    d.mkdir()
    for f in ("board.py", "protocol.yaml"):
        shutil.copy(BOARD / f, d / f)
    shutil.copytree(BOARD / "grid", d / "grid")
    res = d / "results" / "m"
    res.mkdir(parents=True)
    cells = [cell("dense", "dense", 0.0, [0.6] * 6, 20.0, 100, allocation="-"),
             cell("wanda_sp-30", "wanda_sp", 0.3, [0.54] * 6, 30.0, 80),
             cell("obs-refit-30", "obs", 0.3, [0.57] * 6, 25.0, 80, compensate="refit"),
             cell("fbn-global-30", "fbn", 0.3, [0.3] * 6, 90.0, 80, compensate="refit", allocation="global"),
             cell("fbn_maxz-30", "fbn", 0.3, [0.3] * 6, 900.0, 80, fbn_rule="max_z"),
             cell("fbn-bias-30", "fbn", 0.3, [0.3] * 6, 95.0, 80, compensate="bias")]
    for c in cells:
        (res / f"{c['run_info']['cell']}.json").write_text(json.dumps(c))
    return d, load_script(d / "board.py", "board")


def test_summary_csv_and_markdown(board):
    d, mod = board
    assert mod.main() == 0
    with (d / "results" / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "method", "sparsity", "allocation", "ppl128", "ppl2048", "kl", "top1",
                             "mean_acc", "retention", "params"]
    by = {(r["method"], r["allocation"]): r for r in rows}
    assert float(by[("dense", "-")]["retention"]) == 1.0 and float(by[("dense", "-")]["sparsity"]) == 0.0
    assert float(by[("wanda_sp", "uniform")]["retention"]) == pytest.approx(0.9)
    assert float(by[("obs+refit", "uniform")]["retention"]) == pytest.approx(0.95)
    assert float(by[("fbn", "global")]["ppl2048"]) == pytest.approx(72.0)  # default rule + its rebuild: bare name
    assert float(by[("fbn(max_z)", "uniform")]["ppl2048"]) == pytest.approx(720.0)  # another rule says so
    assert float(by[("fbn+bias", "uniform")]["ppl2048"]) == pytest.approx(76.0)  # another compensation too
    md = (d / "README.md").read_text()
    assert "| obs+refit | 30% | uniform | 25.00 |" in md
    assert (d / "results" / "m-retention.png").stat().st_size > 1000
    assert (d / "results" / "m-ppl128.png").stat().st_size > 1000


def test_head_to_head_against_best_baseline(board):
    d, mod = board
    c = cell("fbn-30", "fbn", 0.3, [0.55] * 6, 22.0, 80, compensate="refit")
    for t in c["eval_info"]["tasks"]["tasks"].values():
        t["acc_stderr"] = t["acc_norm_stderr"] = 0.05
    (d / "results" / "m" / "fbn-30.json").write_text(json.dumps(c))
    assert mod.main() == 0
    md = (d / "README.md").read_text()
    # best baseline on perplexity is obs+refit (25 vs dense 20): fbn at 22 removes 60% of its increase;
    # fbn-global and fbn+bias are fbn variants, not baselines, and are never picked
    assert "| 30% | ppl@128 | 22.00 | obs+refit | 25.00 | +60.0% of the increase |" in md
    assert "| 30% | ppl@2048 | 17.60 | obs+refit | 20.00 | +60.0% of the increase |" in md
    # accuracy: 0.55 vs obs+refit's 0.57; only fbn has standard errors (0.05 per task -> 0.0204 on the mean)
    assert "| 30% | mean acc | 0.550 | obs+refit | 0.570 | -0.020 ± 0.020 (tie) |" in md
    # a cell of the grid's fbn recipe measured under an older default compensation is still fbn's row, labelled
    c["run_info"]["compensate"] = "corrrefit"
    (d / "results" / "m" / "fbn-30.json").write_text(json.dumps(c))
    assert mod.main() == 0
    assert "| 30% | ppl@128 | 22.00 (fbn+corrrefit) | obs+refit | 25.00 |" in (d / "README.md").read_text()


def test_board_lists_grid_cells_not_measured(board):
    d, mod = board
    res = d / "results" / "smollm2-135m"
    res.mkdir()
    (res / "dense.json").write_text(json.dumps(cell("dense", "dense", 0.0, [0.6] * 6, 20.0, 100, allocation="-")))
    (res / "flap-bias-30.json").write_text(json.dumps(cell("flap-bias-30", "flap", 0.3, [0.5] * 6, 30.0, 80,
                                                           compensate="bias")))
    grid = sorted(p.stem for p in (BOARD / "grid" / "smollm2-135m").glob("*.yaml"))
    assert "flap-bias-30" in grid
    assert mod.main() == 0
    md = (d / "README.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("Not measured yet"))
    assert line.startswith(f"Not measured yet ({len(grid) - 1} of the {len(grid)} grid cells;")
    listed = line.split(": ", 1)[1].rstrip(".").split(", ")
    assert listed == [n for n in grid if n != "flap-bias-30"]
    assert "Not measured yet" not in md.split("## smollm2-135m")[0]  # model "m" has no grid


def test_header_names_every_command_and_busy_cells(board):
    d, mod = board
    res = d / "results" / "m"
    c = json.loads((res / "wanda_sp-30.json").read_text())
    c["meta_info"].update(command="python run.py --cells wanda_sp-30", provenance={"date": "2026-01-02T00:00:00Z"})
    c["meta_info"]["machine"]["busy"] = True
    (res / "wanda_sp-30.json").write_text(json.dumps(c))
    assert mod.main() == 0
    header = next(ln for ln in (d / "README.md").read_text().splitlines() if ln.startswith("Machine:"))
    # a resumed grid: both commands with their cell counts, the date seen, the cell started on a loaded machine
    commands = {cmd: int(n) for cmd, n in re.findall(r"`([^`]+)` \((\d+) cells?\)", header)}
    assert commands == {"python run.py": 5, "python run.py --cells wanda_sp-30": 1}
    assert re.search(r"Dates: (\S+) to (\S+)\.", header).groups() == ("2026-01-02T00:00:00Z",) * 2
    measured = re.search(r"Cells measured: (\d+), (\d+) of them started with the 1-minute load average", header)
    assert tuple(map(int, measured.groups())) == (6, 1)


def test_rows_grouped_by_shown_sparsity_and_ranked_by_ppl2048(board):
    d, mod = board
    res = d / "results" / "m"
    # global allocation lands a few neurons off the uniform fraction: 0.2999 must still sit among the 30% rows,
    # not before them, and ranking inside the group follows ppl@2048 even where ppl@128 disagrees
    c = json.loads((res / "fbn-global-30.json").read_text())
    c["run_info"]["sparsity"] = 0.2999
    (res / "fbn-global-30.json").write_text(json.dumps(c))
    c = json.loads((res / "obs-refit-30.json").read_text())
    c["eval_info"]["ppl2048"]["ppl"] = 80.0  # best ppl@128 (25) but now behind fbn-global (72) and fbn+bias (76)
    (res / "obs-refit-30.json").write_text(json.dumps(c))
    assert mod.main() == 0
    lines = [ln for ln in (d / "README.md").read_text().split("## m", 1)[1].splitlines() if ln.startswith("| ")]
    table = lines[1:1 + 6]  # after the header, the first table holds dense and the five 30% cells
    assert [ln.split(" | ")[0][2:] + "/" + ln.split(" | ")[2] for ln in table] == [
        "dense/-", "wanda_sp/uniform", "fbn/global", "fbn+bias/uniform", "obs+refit/uniform", "fbn(max_z)/uniform"]


def test_retention_column_head_to_head_and_guards(board):
    """KL and top-1 come from each cell's retention entry (dense: 0 and 1); fbn's KL is set against the best
    baseline's; a dense row fed off its training distribution is flagged; carried-over cells are counted."""
    d, mod = board
    res = d / "results" / "m"
    for name, kl, top1 in (("wanda_sp-30", 0.30, 0.70), ("obs-refit-30", 0.20, 0.75)):
        c = json.loads((res / f"{name}.json").read_text())
        c["eval_info"]["retention"] = {"kl": kl, "top1_agreement": top1}
        c["meta_info"]["carried_from"] = "v2/results/m/x.json (perplexity, tasks)"
        (res / f"{name}.json").write_text(json.dumps(c))
    c = cell("fbn-30", "fbn", 0.3, [0.55] * 6, 22.0, 80, compensate="refit")
    c["eval_info"]["retention"] = {"kl": 0.15, "top1_agreement": 0.8}
    c["meta_info"]["carry_refused"] = {"seq_len": 2048, "archived": 21.0, "remeasured": 22.0, "from": "v2/..."}
    (res / "fbn-30.json").write_text(json.dumps(c))
    assert mod.main() == 0
    md = (d / "README.md").read_text()
    assert "| dense | 0% | - | 20.00 | 16.00 | 0.0000 | 1.000 |" in md
    assert "| obs+refit | 30% | uniform | 25.00 | 20.00 | 0.2000 | 0.750 |" in md
    assert "| wanda_sp | 30% | uniform | 30.00 | 24.00 | 0.3000 | 0.700 |" in md
    assert "| fbn-global" not in md and "| fbn | 30% | global | 90.00 | 72.00 | — | — |" in md
    assert "| 30% | KL to dense | 0.1500 | obs+refit | 0.2000 | +25.0% of the KL |" in md
    assert "2 cells carry their perplexities and accuracies over" in md
    assert "1 archived cells did not reproduce when pruned again" in md and "measured in full: fbn-30." in md
    assert "**Warning**" not in md  # dense 20 / 16: plausible
    with (d / "results" / "summary.csv").open() as f:
        by = {r["method"]: r for r in csv.DictReader(f) if r["allocation"] == "uniform"}
    assert float(by["fbn"]["kl"]) == pytest.approx(0.15) and float(by["obs+refit"]["top1"]) == pytest.approx(0.75)
    dense = json.loads((res / "dense.json").read_text())
    dense["eval_info"]["ppl128"]["ppl"] = 864.0  # Gemma 3 without its <bos>: 864 at 128 against 61.8 at 2048
    dense["eval_info"]["ppl2048"]["ppl"] = 61.8
    (res / "dense.json").write_text(json.dumps(dense))
    assert mod.main() == 0
    assert "**Warning**: dense ppl@128 / ppl@2048 = 14.0" in (d / "README.md").read_text()


def test_earlier_versions_link_their_board_or_name_the_commit(board):
    """v1's folder left the tree: the board names the commit that has it instead of a dead link."""
    d, mod = board
    (d / "v2").mkdir()
    (d / "v2" / "README.md").write_text("# v2\n")
    assert mod.main() == 0
    line = next(ln for ln in (d / "README.md").read_text().splitlines() if "Earlier protocol versions" in ln)
    sha = mod.REMOVED_VERSIONS[1]
    assert f"v1 (in git at commit {sha}: `git show {sha}:benchmarks/leaderboard/v1/README.md`)" in line
    assert "[v2](v2/README.md)" in line and "(v1/README.md)" not in line


def test_method_labels_say_what_differs_from_the_default():
    label = load_script(BOARD / "board.py", "board_labels").method_label

    def ri(method, compensate="none", **prune):
        return {"method": method, "compensate": compensate, "recipe": {"prune": prune}}

    assert label(ri("wanda_sp")) == "wanda_sp" and label(ri("obs", "refit")) == "obs+refit"
    assert label(ri("fbn", "refit")) == "fbn" and label(ri("fbn", "bias")) == "fbn+bias"
    assert label(ri("obs", "refit", sequential=True, refit_target="layer")) == "obs+refit seq"
    assert label(ri("obs", "refit", sequential=True, refit_target="dense")) == "obs+refit seq(dense)"
    assert label(ri("wanda_sp", "bias", sequential=True, refit_target="dense")) == "wanda_sp+bias seq"
