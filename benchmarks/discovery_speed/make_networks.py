"""Produce the cached ``networks/`` artifacts for a real model and copy their summary next to this script.

This is what a ``discover`` CLI verb does: collect document-mode activations (one text per sequence, so blocks
of texts are disjoint row ranges), then :func:`fbnprune.discover.run_discovery`. The summary (parameters, data
hash, model, runs ok/failed, per-layer network counts, sizes and recurrence) is written to
``networks_<model>.json``; the tensors stay in the cache (``$FBNPRUNE_CACHE/networks/<key>``).

    nice -n 5 .venv/bin/python benchmarks/discovery_speed/make_networks.py smollm2-135m --tokens 18700 \\
        --components 128 --restarts 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import command_line, write_json  # noqa: E402
from fbnprune.collect import collect, make_sequences  # noqa: E402
from fbnprune.discover import DiscoverConfig, run_discovery  # noqa: E402
from fbnprune.models import load_model  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=18_700)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--components", type=int, default=128)
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--block-texts", type=int, default=40)
    ap.add_argument("--threshold", type=float, default=3.6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    batch = make_sequences(lm.tokenizer, "wikitext2-valid", n_tokens=args.tokens, seq_len=args.seq_len,
                           mode="document")
    t0 = time.perf_counter()
    store = collect(lm.model, batch, model_info=lm.info, keep_activations=True)
    t_collect = time.perf_counter() - t0
    cfg = DiscoverConfig(n_components=args.components, n_restarts=args.restarts, block_texts=args.block_texts,
                         threshold=args.threshold)
    nets = run_discovery(store, cfg)
    summary = dict(nets.summary)
    summary["networks_path"] = str(nets.path)
    summary["collect_s_or_cached"] = round(t_collect, 1)
    summary["command"] = command_line()
    write_json(HERE / f"networks_{args.model}.json", summary, indent=1)
    print(nets, f"{summary['seconds']} s")
    for row in summary["per_layer"]:
        print(row)


if __name__ == "__main__":
    main()
