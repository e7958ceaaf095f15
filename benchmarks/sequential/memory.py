"""Peak memory of pruning, parallel vs sequential, each measured in a fresh process (its peak RSS).

    python benchmarks/sequential/memory.py synthetic        # a deep random Llama, >= 2 GiB of fp32 weights
    python benchmarks/sequential/memory.py synthetic --layers 128 --modes sequential-onload   # twice as deep
    python benchmarks/sequential/memory.py real --model smollm2-135m

Modes, all OBS + re-fit at 50 % of MLP neurons:

* ``parallel``: the model loaded whole, every layer's activations captured from the dense model, then pruned;
* ``sequential``: the model loaded whole, pruned layer by layer (:func:`fbnprune.prune.sequential.prune_sequential`);
* ``sequential-onload``: the model built on the ``meta`` device, each decoder layer read from the safetensors
  checkpoint, pruned, written out and released (:class:`fbnprune.prune.sequential.CheckpointLayers`).

The synthetic model (random weights, cached under the fbnprune cache, never committed) is calibrated on seeded
random tokens; the real models on the leaderboard's calibration text. Each child prints one JSON line; the parent
adds it to ``memory.json`` as soon as it finishes (peak RSS in MB, weights in MB, seconds, a digest of the pruned
MLP weights: equal for the two sequential modes when both ran, ``sequential_equal``). ``--modes`` measures only
some modes. The Python interpreter with torch and transformers imported takes about
260 MB of that peak on its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.runner import record, write_json  # noqa: E402

MODES = ("parallel", "sequential", "sequential-onload")
#: the synthetic model: narrow and deep, so that one layer is small next to the whole (64 x 42 MB)
SYNTH = dict(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=64, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True)


def synthetic_config(layers: int) -> dict[str, Any]:
    """The synthetic model's config with ``layers`` decoder layers (42 MB of float32 weights each)."""
    return {**SYNTH, "num_hidden_layers": int(layers)}


def synthetic_dir(config: dict[str, Any]) -> Path:
    """The synthetic checkpoint of ``config`` (built once, cached by its config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: F401

    from fbnprune.paths import cache_dir

    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    d = cache_dir() / "synthetic" / f"llama-deep-{key}"
    if (d / "config.json").is_file():
        return d
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32)
    with torch.no_grad():  # MLP outputs that matter next to the residual stream, as in the tiny test models
        for n, p in model.named_parameters():
            if "mlp" in n and p.dim() == 2:
                p.mul_(4.0)
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    tmp.rename(d)
    return d


def weights_mb(d: Path) -> float:
    return round(sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20, 1)


def _calibration(kind: str, model_dir: Path) -> list[Any]:
    import torch

    if kind == "synthetic":
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, SYNTH["vocab_size"], (256,), generator=g) for _ in range(8)]
    import yaml
    from transformers import AutoTokenizer

    from fbnprune.collect import make_sequences

    c = yaml.safe_load((ROOT / "benchmarks" / "leaderboard" / "protocol.yaml").read_text())["calibration"]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return make_sequences(tok, c["source"], n_tokens=c["n_tokens"], seq_len=c["seq_len"], seed=c["seed"]).sequences


class _LazyTensors(dict):
    """The MLP tensors of a written checkpoint, read one at a time (the digest must not load the whole model)."""

    def __init__(self, d: Path) -> None:
        index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        super().__init__({n: d / f for n, f in index.items() if ".mlp." in n})

    def __getitem__(self, name: str) -> Any:
        from safetensors import safe_open

        with safe_open(str(dict.__getitem__(self, name)), framework="pt") as fh:
            return fh.get_tensor(name)


def _digest(tensors: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for n in sorted(tensors):
        if ".mlp." in n:
            h.update(n.encode())
            h.update(tensors[n].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def child(kind: str, model_dir: Path, mode: str) -> dict[str, Any]:
    """Prune in this process and report its peak RSS."""
    import torch
    from transformers import AutoModelForCausalLM

    from fbnprune.arch import get_adapter
    from fbnprune.collect import TokenBatch, capture_activations
    from fbnprune.export.compare import peak_rss_mb  # VmHWM: ru_maxrss would carry a forking parent's peak
    from fbnprune.prune import ScoreContext, apply_plan_, compensate_, make_plan, score_neurons
    from fbnprune.prune.sequential import (
        CheckpointLayers,
        InMemoryLayers,
        SequentialOptions,
        prune_sequential,
    )

    seqs = _calibration(kind, model_dir)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fbnprune-mem-"))
    opts = SequentialOptions(method="obs", sparsity=0.5, compensate="refit", progress=False)
    try:
        if mode == "parallel":
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
            adapter = get_adapter(model)
            store = capture_activations(model, TokenBatch.build(seqs, kind, "pack"), work / "store", drop_first=0,
                                        progress=False)
            ctx = ScoreContext(model=model, adapter=adapter, store=store, sparsity=0.5, progress=False)
            plan = make_plan(score_neurons("obs", ctx), sparsity=0.5, allocation="uniform", protected=[])
            compensate_(model, plan, store, "refit", progress=False)
            apply_plan_(model, plan)
            digest = _digest(dict(model.state_dict()))
        elif mode == "sequential":
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
            prune_sequential(InMemoryLayers(model, get_adapter(model)), seqs, opts, work / "seq")
            digest = _digest(dict(model.state_dict()))
        else:
            layers = CheckpointLayers(model_dir, work / "out")
            res = prune_sequential(layers, seqs, opts, work / "seq")
            out = layers.write_checkpoint(res.plan)
        # the peak of pruning, before the digest reads the result back
        peak = peak_rss_mb()
        if mode == "sequential-onload":
            digest = _digest(_LazyTensors(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"mode": mode, "peak_rss_mb": round(peak, 1), "seconds": round(time.perf_counter() - t0, 1),
            "mlp_digest": digest}


def measure(kind: str, model_dir: Path, name: str, modes: list[str], out: Path, config: Any) -> None:
    """Each mode in a fresh process; ``out`` is updated after each one (a row per model and mode, the latest
    measurement replacing an earlier one), so a long run keeps what it finished."""
    for mode in modes:
        print(f"[memory] {name}: {mode} ...", flush=True)
        p = subprocess.run([sys.executable, __file__, "_child", kind, str(model_dir), mode], capture_output=True,
                           text=True)
        if p.returncode != 0:
            raise SystemExit(f"{name} {mode} failed:\n{p.stderr[-3000:]}")
        row = {"model": name, "weights_mb": weights_mb(model_dir), **json.loads(p.stdout.strip().splitlines()[-1]),
               **record()}
        print(f"[memory] {name}: {row['mode']} peak RSS {row['peak_rss_mb']} MB, {row['seconds']} s", flush=True)
        data = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
        run = data["runs"].setdefault(name, {"rows": [], "config": config})
        run["rows"] = [r for r in run["rows"] if r["mode"] != mode] + [row]
        digests = {r["mode"]: r["mlp_digest"] for r in run["rows"]}
        if "sequential" in digests and "sequential-onload" in digests:
            run["sequential_equal"] = digests["sequential"] == digests["sequential-onload"]
        write_json(out, data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("synthetic")
    r = sub.add_parser("real")
    r.add_argument("--model", required=True, choices=["smollm2-135m", "gemma3-270m"])
    sub.choices["synthetic"].add_argument("--layers", type=int, default=SYNTH["num_hidden_layers"],
                                          help="decoder layers of the synthetic model (default: %(default)s)")
    for sp in (sub.choices["synthetic"], r):
        sp.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    c = sub.add_parser("_child")
    c.add_argument("kind")
    c.add_argument("model_dir", type=Path)
    c.add_argument("mode", choices=MODES)
    args = ap.parse_args(argv)
    if args.cmd == "_child":
        print(json.dumps(child(args.kind, args.model_dir, args.mode)))
        return 0
    if args.cmd == "synthetic":
        config = synthetic_config(args.layers)
        d, name, kind = synthetic_dir(config), f"synthetic-llama-{args.layers}x1024", "synthetic"
    else:
        from fbnprune.models.builtins import BUILTINS
        from fbnprune.models.load import _converted_gguf_dir

        d, name, kind = _converted_gguf_dir(BUILTINS[args.model].locate())[0], args.model, "real"
    out = HERE / "memory.json"
    measure(kind, d, name, args.modes, out, config if kind == "synthetic" else None)
    print(f"[memory] wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
