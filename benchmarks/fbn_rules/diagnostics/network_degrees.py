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
import time
from pathlib import Path

from fbnprune.discover.networks import NetworkSet
from fbnprune.prune.networks import network_neighbourhoods


def degrees(path: str) -> dict[str, object]:
    nets = NetworkSet.load(path)
    alone, size = [], []
    for layer in range(len(nets.widths)):
        deg = network_neighbourhoods(nets, layer).sum(1).float()
        alone.append(float((deg == 0).float().mean()))
        size.append(float(deg[deg > 0].mean()) if bool((deg > 0).any()) else 0.0)
    model = json.loads((Path(path) / "summary.json").read_text()).get("model") or {}
    return {"networks": Path(path).name, "model": model.get("source") if isinstance(model, dict) else model,
            "layers": len(alone),
            "alone_fraction": {"mean": sum(alone) / len(alone), "min": min(alone), "max": max(alone)},
            "mean_neighbours_of_members": sum(size) / len(size), "per_layer_alone": alone,
            "per_layer_neighbours": size}


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "artifacts": [degrees(p) for p in sys.argv[1:]]}
    for a in out["artifacts"]:
        print(f"{a['model']}: {a['alone_fraction']['mean']:.3f} of neurons in no network (per-layer mean), "
              f"{a['mean_neighbours_of_members']:.1f} neighbours per member")
    (Path(__file__).parent / "network_degrees.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
