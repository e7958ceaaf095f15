"""CLI behaviour: listing, validation, copying, and clean failures (exit 2, one line, nothing written)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import OPTConfig, OPTForCausalLM

from fbnprune.cli import main


def test_recipes_lists_quickstart(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "SmolLM2" in out


def test_validate_ok_and_bad(tmp_path, capsys):
    assert main(["validate", "quickstart"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nmodel: {source: smollm2-135m}\nprune: {sparsity: 1.5}\ncollect: {n_tokenz: 3}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "2 error(s)" in err and "prune.sparsity" in err and "collect.n_tokenz: unknown key" in err


def test_cp_copies_and_refuses_overwrite(tmp_path, capsys):
    dest = tmp_path / "mine.yaml"
    assert main(["cp", "quickstart", str(dest)]) == 0
    assert "name: quickstart" in dest.read_text()
    assert main(["cp", "quickstart", str(dest)]) == 2
    assert main(["cp", "no-such-recipe", str(tmp_path / "x.yaml")]) == 2


@pytest.mark.parametrize(
    "source, message",
    [
        ("smolm2-135m", "unknown built-in model"),
        ("/nonexistent/model.gguf", "GGUF file not found"),
    ],
)
def test_bad_source_fails_cleanly_and_writes_nothing(tmp_path, capsys, source, message):
    out = tmp_path / "out"
    code = main(["run", "quickstart", f"model.source={source}", f"output_dir={out}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unsupported_architecture_fails_cleanly(tmp_path, capsys):
    model_dir = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                             num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(model_dir)
    out = tmp_path / "out"
    assert main(["run", "quickstart", f"model.source={model_dir}", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'opt'" in err and "llama" in err
    assert not out.exists()


def test_module_entry_point_exit_code(tmp_path):
    """One fresh interpreter (4-9 s) proves `python -m fbnprune` turns a user error into exit code 2. The output
    goes to a fresh directory: the default one may hold an earlier `make run`, which is refused first."""
    r = subprocess.run([sys.executable, "-m", "fbnprune", "run", "quickstart", "model.source=nope",
                        f"output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("fbnprune: error: unknown built-in model 'nope'")


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["bogus"])
    assert ei.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_stage_commands_are_listed(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for verb in ("run", "collect", "discover", "prune", "evaluate", "export", "validate", "recipes", "cp"):
        assert verb in out
