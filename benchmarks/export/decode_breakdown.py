"""Where one greedy decode step spends its time, dense vs slim: the basis for judging the speed-up target.

For each export directory (loaded in its own fresh process) one decode step (1 new token, KV cache of a fixed
prompt) is timed as a whole and again with every MLP replaced by a zero-returning stub. The difference is the MLP
time; what remains is attention, norms, embedding, the LM head and the per-op framework overhead. The LM-head
matmul is also timed alone. Times are CPU time of the (single-threaded) process by default (``--clock cpu``),
because wall time on a shared machine mostly measures the other processes. If the non-MLP time stays the same while only the MLP time shrinks with the neuron
count, the speed-up is bounded by (t_rest + t_mlp_dense) / (t_rest + t_mlp_slim), whatever the parameter ratio.

    nice .venv/bin/python benchmarks/export/decode_breakdown.py DENSE_DIR SLIM_DIR --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import command_line, write_json  # noqa: E402
from fbnprune.export.compare import machine  # noqa: E402


def _child(path: str, threads: int, reps: int, use_cpu: bool) -> dict[str, Any]:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.arange(10, 30).unsqueeze(0)

    clock = time.process_time if use_cpu else time.perf_counter

    @torch.inference_mode()
    def step_time() -> float:
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(reps):  # the cache grows by one token per step (20 -> 20 + reps), as in generation
            t = clock()
            model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            times.append(clock() - t)
        return statistics.median(times)

    class Zero(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x)

    step_time()  # warm-up
    full = step_time()
    layers = model.model.layers
    mlps = [layer.mlp for layer in layers]
    for layer in layers:
        layer.mlp = Zero()
    no_mlp = step_time()
    for layer, m in zip(layers, mlps, strict=True):
        layer.mlp = m
    head = model.get_output_embeddings().weight
    h = torch.randn(1, 1, head.shape[1])
    with torch.inference_mode():
        for _ in range(3):
            torch.nn.functional.linear(h, head)
        ts = []
        for _ in range(reps):
            t = clock()
            torch.nn.functional.linear(h, head)
            ts.append(clock() - t)
    return {"path": path, "step_ms": round(full * 1e3, 3), "step_without_mlp_ms": round(no_mlp * 1e3, 3),
            "mlp_ms": round((full - no_mlp) * 1e3, 3), "lm_head_ms": round(statistics.median(ts) * 1e3, 3),
            "intermediate_size": model.config.intermediate_size, "loadavg": list(os.getloadavg())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dense", nargs="?")
    ap.add_argument("slim", nargs="?")
    ap.add_argument("--child")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process_time, robust on a shared machine (default); wall: perf_counter")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(_child(a.child, a.threads, a.reps, a.clock == "cpu")))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1"}
    res: dict[str, list[dict[str, Any]]] = {"dense": [], "slim": []}
    for _ in range(a.rounds):
        for which, p in (("dense", a.dense), ("slim", a.slim)):
            r = subprocess.run([sys.executable, __file__, "--child", p, "--threads", str(a.threads),
                                "--reps", str(a.reps), "--clock", a.clock], capture_output=True, text=True, env=env,
                               check=True)
            res[which].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(which, res[which][-1], flush=True)

    def med(w: str, k: str) -> float:
        return round(statistics.median(x[k] for x in res[w]), 3)

    keys = ("step_ms", "step_without_mlp_ms", "mlp_ms", "lm_head_ms")
    out = {w: {k: med(w, k) for k in keys} for w in res}
    d, s = out["dense"], out["slim"]
    out["step_speedup"] = round(d["step_ms"] / s["step_ms"], 4)
    out["mlp_speedup"] = round(d["mlp_ms"] / s["mlp_ms"], 4)
    out["mlp_share_dense"] = round(d["mlp_ms"] / d["step_ms"], 4)
    out["settings"] = {"threads": a.threads, "reps": a.reps, "rounds": a.rounds, "prompt_tokens": 20, "clock": a.clock,
                       "machine": machine(),
                       "command": command_line()}
    out["runs"] = res
    if a.out:
        write_json(Path(a.out), out)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
