"""How many network neighbours a neuron has, per model: the size of the neighbourhoods the redundancy rule uses.

    python benchmarks/fbn_rules/diagnostics/network_degrees.py NETWORKS_DIR [NETWORKS_DIR ...]

NETWORKS_DIR: a ``networks/`` artifact (``python -m fbnprune discover``; the leaderboard's are in the cache under
``networks/<hash>/``). Prints, and writes next to this file as ``network_degrees.json``, per artifact: the
fraction of neurons in no network (per-layer mean, min, max) and the mean number of network neighbours of the
neurons that have any (union over runs, as ``network_neighbourhoods`` gives them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import record, write_json  # noqa: E402
from fbnprune.discover.networks import NetworkSet  # noqa: E402
from fbnprune.prune.networks import network_neighbourhoods  # noqa: E402


def degrees(path: str) -> dict[str, object]:
    nets = NetworkSet.load(path)
    alone, size = [], []
    for layer in range(len(nets.widths)):
        deg = network_neighbourhoods(nets, layer).sum(1).float()
        alone.append(float((deg == 0).float().mean()))
        size.append(float(deg[deg > 0].mean()) if bool((deg > 0).any()) else 0.0)
    model = json.loads((Path(path) / "summary.json").read_text()).get("model") or {}
    out = {"networks": Path(path).name, "model": model.get("source") if isinstance(model, dict) else model,
           "layers": len(alone),
           "alone_fraction": {"mean": sum(alone) / len(alone), "min": min(alone), "max": max(alone)},
           "mean_neighbours_of_members": sum(size) / len(size), "per_layer_alone": alone,
           "per_layer_neighbours": size}
    print(f"{out['model']}: {out['alone_fraction']['mean']:.3f} of neurons in no network (per-layer mean), "
          f"{out['mean_neighbours_of_members']:.1f} neighbours per member", flush=True)
    return out


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    write_json(Path(__file__).parent / "network_degrees.json",
               {**record(), "artifacts": [degrees(p) for p in sys.argv[1:]]}, indent=1)


if __name__ == "__main__":
    main()
