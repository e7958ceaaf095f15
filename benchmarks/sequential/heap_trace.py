"""Per-layer memory trace of layer-by-layer loading (``CheckpointLayers``): resident anonymous memory and the
peak (``VmHWM``) after every layer, to tell a leak (the resident set grows) from heap fragmentation (the resident
set stays flat while the peak creeps up).

    OMP_NUM_THREADS=1 python benchmarks/sequential/heap_trace.py MODEL_DIR            # e.g. memory.py's synthetic model
    MALLOC_MMAP_THRESHOLD_=1048576 OMP_NUM_THREADS=1 python benchmarks/sequential/heap_trace.py MODEL_DIR

Prints one line per layer (layer, VmHWM, RssAnon, RssFile in MB). ``heap_trace.json`` holds the two traces that
motivated :func:`fbnprune.prune.sequential.map_large_allocations`, taken before it existed (the second run sets
the same glibc threshold through the environment).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fbnprune.prune.sequential import CheckpointLayers, SequentialOptions, prune_sequential  # noqa: E402


def status_mb() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(line.split()[1]) // 1024 for line in text.splitlines() for k in ("VmHWM", "RssAnon", "RssFile")
            if line.startswith(k + ":")}


def main(model_dir: str) -> None:
    finish = CheckpointLayers.finish

    def traced(self: CheckpointLayers, i: int, layer: torch.nn.Module) -> None:
        finish(self, i, layer)
        print(i, status_mb(), flush=True)

    CheckpointLayers.finish = traced  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 1024, (256,), generator=g) for _ in range(8)]  # memory.py's synthetic calibration
    work = Path(tempfile.mkdtemp(prefix="fbnprune-heap-"))
    opts = SequentialOptions(method="obs", sparsity=0.5, compensate="refit", progress=False)
    prune_sequential(CheckpointLayers(model_dir, work / "out"), seqs, opts, work / "seq")


if __name__ == "__main__":
    main(sys.argv[1])
