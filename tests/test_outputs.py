"""Output-directory checks: every refusal happens before a model loads, with one line and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fbnprune
from fbnprune.cli import main
from fbnprune.errors import UserError
from fbnprune.outputs import check_output_dir
from fbnprune.recipe import load_recipe

PACKAGE = Path(fbnprune.__file__).resolve().parent
# /proc takes no new entries even from root, whose permission bits say it may write anywhere: the one unwritable
# place a test running as root can rely on
needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


def previous_output(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "report.json").write_text("{}")
    (d / "keep_plan.json").write_text("{}")
    return d


def test_new_nested_and_empty_directories_are_accepted_and_left_untouched(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # neither "a" nor the probe was left behind


def test_previous_output_needs_overwrite(tmp_path):
    out = previous_output(tmp_path / "out")
    with pytest.raises(UserError, match="earlier run's output; pass --overwrite"):
        check_output_dir(out)
    assert check_output_dir(out, overwrite=True) == out
    assert sorted(p.name for p in out.iterdir()) == ["keep_plan.json", "report.json"]


@pytest.mark.parametrize("marker", ["analysis.json", "fbnprune_export.json"])
def test_analysis_and_bare_exports_count_as_previous_output(tmp_path, marker):
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")
    with pytest.raises(UserError, match="earlier run's output"):
        check_output_dir(out)


def test_a_directory_fbnprune_did_not_write_is_never_replaced(tmp_path):
    """Replacing deletes the old directory, so a home directory or a checkout must not qualify, flag or not."""
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="holds files that no fbnprune run wrote"):
            check_output_dir(tmp_path, overwrite=overwrite)
    with pytest.raises(UserError, match="is not a directory"):
        check_output_dir(tmp_path / "notes.txt", overwrite=True)


@pytest.mark.parametrize("inside", [".", "recipes/mine", "evaluate/out"])
def test_inside_the_installed_package_is_refused(inside):
    with pytest.raises(UserError, match="inside the installed fbnprune package"):
        check_output_dir(PACKAGE / inside, overwrite=True)


@needs_proc
def test_unwritable_parent_is_refused(tmp_path):
    with pytest.raises(UserError, match="/proc is not writable"):
        check_output_dir("/proc/x")
    with pytest.raises(UserError, match="is not a directory"):
        (tmp_path / "file").write_text("")
        check_output_dir(tmp_path / "file" / "out")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    import fbnprune.run

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(fbnprune.run, "load", refuse)


@needs_proc
@pytest.mark.parametrize("verb", ["run", "prune", "evaluate", "export", "analyze"])
def test_cli_refuses_before_loading_with_one_line(tmp_path, capsys, no_model_load, verb):
    recipe = "quickstart" if verb != "analyze" else "analyze-smollm2-135m"
    out = previous_output(tmp_path / "out")
    cases = [("/proc/x", "/proc is not writable"), (str(PACKAGE / "x"), "inside the installed fbnprune package"),
             (str(out), "pass --overwrite"), (str(tmp_path), "no fbnprune run wrote")]
    for target, message in cases:
        assert main([verb, recipe, "-o", target]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("fbnprune: error: ") and message in err, err
    assert not (PACKAGE / "x").exists()
    assert json.loads((out / "report.json").read_text()) == {}


def test_collect_and_discover_write_no_output_and_skip_the_check(tmp_path, monkeypatch):
    import fbnprune.run

    monkeypatch.setattr(fbnprune.run, "load", lambda recipe: (_ for _ in ()).throw(RuntimeError("loaded")))
    with pytest.raises(RuntimeError, match="loaded"):  # got past the (skipped) check to the model
        fbnprune.run.run(load_recipe("quickstart"), output_dir="/proc/x", until="collect")
