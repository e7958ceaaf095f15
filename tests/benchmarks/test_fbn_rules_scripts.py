"""The fbn rule study's scripts still import (the study scorers moved out of fbnprune into variants.py) and parse
their arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.benchmarks import BENCHMARKS


@pytest.mark.parametrize("script", ["run.py", "summarize.py"])
def test_help(script):
    out = subprocess.run([sys.executable, str(BENCHMARKS / "fbn_rules" / script), "--help"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")
