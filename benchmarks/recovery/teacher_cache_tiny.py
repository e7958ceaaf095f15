"""Is the cached teacher (``recover.teacher_topk``) faster? Measured on the tiny test model only.

A 2-layer random Llama (vocab 256, tests/conftest.py) distils into its pruned copy for three passes over its
training text, with the teacher run every step and with its top-16 log-probabilities cached once per window; the
two settings alternate, twice, so a change of machine load hits both. Writes ``teacher_cache_tiny.json`` here.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recovery/teacher_cache_tiny.py

The tiny model says nothing about SmolLM2's ratio (its vocabulary is 192x larger); it shows that the cache runs
the teacher once per window and what that saves when the teacher is a third of the work.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from fbnprune.provenance import machine  # noqa: E402
from fbnprune.recover import recover_  # noqa: E402
from tests.conftest import make_tiny_env, word_tokenizer  # noqa: E402
from tests.recover.helpers import config, pair  # noqa: E402


def main() -> None:
    root = make_tiny_env(Path(tempfile.mkdtemp(prefix="fbnprune-cache-")))
    rows = []
    load_before = os.getloadavg()
    for repeat in range(2):
        for topk in (None, 16):
            teacher, student = pair()
            rec = recover_(teacher, student, word_tokenizer(),
                           config(root, lr=1e-2, teacher_topk=topk, max_tokens=3 * 4800), progress=False)
            rows.append({"repeat": repeat, "teacher_topk": topk, "tokens": rec["tokens"],
                         "passes_over_text": rec["passes_over_text"], "tokens_per_s": rec["tokens_per_s"],
                         "teacher_forward_tokens": rec["teacher"]["forward_tokens"]})
            print(rows[-1], flush=True)
    out = {"command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recovery/teacher_cache_tiny.py",
           "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()), "machine": machine(),
           "threads": os.environ.get("OMP_NUM_THREADS"), "load_average_1min": [load_before[0], os.getloadavg()[0]],
           "model": "tests/conftest.py tiny_model('llama'): 2 layers, hidden 64, 128 MLP neurons, vocab 256; "
                    "student keeps 64 / 43 neurons", "rows": rows}
    (HERE / "teacher_cache_tiny.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
