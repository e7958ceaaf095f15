"""Verified compression: parameters, bytes on disk, peak RAM when loading and generation speed, dense vs slim.

Every measurement runs in a fresh Python process (``python -m fbnprune.export.compare --probe DIR``), so peak
RSS is that of loading one model and nothing else, and no cache or allocator state carries over. Dense and slim
probes are interleaved in rounds, so a change in machine load hits both. Generation is greedy, batch 1, a fixed
prompt and a fixed number of new tokens (EOS suppressed), with fixed torch threads, after one warm-up call.

Usage::

    python -m fbnprune.export.compare DENSE_DIR SLIM_DIR --out compare.json [--threads 1] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fbnprune.provenance import machine  # noqa: F401  (re-exported: reports name the machine)

PROMPT = "The history of the city begins in the early Middle Ages, when"


def weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files (``*.safetensors``) of an export directory."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    Linux's ``VmHWM`` belongs to the current address space, so it starts fresh at ``exec``. ``ru_maxrss`` does not:
    the kernel carries the parent's high-water mark over fork+exec, so a probe started from a process that held a
    model would report the parent's peak. ``ru_maxrss`` is the fallback where ``/proc`` is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------- probe (child)
def _probe(path: str, threads: int, new_tokens: int, runs: int, prompt: str) -> dict[str, Any]:
    """Runs inside the fresh process: load, count, generate; prints one JSON line."""
    import torch

    torch.set_num_threads(threads)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    man = Path(path) / "fbnprune_export.json"
    loader = json.loads(man.read_text()).get("loader", "stock") if man.is_file() else "stock"
    if loader == "stock":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:  # imported here: a stock load's peak memory must not include fbnprune's own modules
        from fbnprune.export.hf import load_pretrained

        model = load_pretrained(path, dtype="float32")
    model.eval()
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seen: set[int] = set()
    params = 0
    for p in model.parameters():  # tied weights counted once
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    kw = dict(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    cpu: list[float] = []

    def timed(n: int) -> tuple[float, Any]:
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(ids, **{**kw, "max_new_tokens": n, "min_new_tokens": n})
        if n == new_tokens:
            cpu.append(time.process_time() - c)
        return time.perf_counter() - t, out

    timed(new_tokens)  # warm-up: every weight has now been read at least once
    cpu.clear()
    rss_run = peak_rss_mb()
    full, one = [], []
    out = None
    for _ in range(runs):
        s, out = timed(new_tokens)
        full.append(s)
        one.append(timed(1)[0])
    assert out is not None
    n_new = out.shape[1] - ids.shape[1]
    med, med1 = statistics.median(full), statistics.median(one)
    return {
        "path": path, "loader": loader, "params": params, "bytes": weight_bytes(path),
        "peak_rss_mb": round(rss_run, 1), "peak_rss_after_load_mb": round(rss_loaded, 1),
        "rss_increase_mb": round(rss_run - rss_before, 1), "ru_maxrss_after_load_mb": round(ru_maxrss, 1),
        "load_s": round(load_s, 2), "threads": threads, "prompt_tokens": int(ids.shape[1]), "new_tokens": int(n_new),
        "gen_s_runs": [round(x, 4) for x in full], "tok_s": round(n_new / med, 3),
        "cpu_s_runs": [round(x, 4) for x in cpu], "tok_per_cpu_s": round(n_new / statistics.median(cpu), 3),
        "decode_tok_s": round((n_new - 1) / max(med - med1, 1e-9), 3),
        "first_token_s": round(med1, 4), "text": tok.decode(out[0, ids.shape[1]:]),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def probe(path: str | Path, threads: int = 1, new_tokens: int = 64, runs: int = 3, prompt: str = PROMPT,
          nice: int = 0) -> dict[str, Any]:
    """Measure one export directory in a fresh interpreter."""
    cmd = [sys.executable, "-m", "fbnprune.export.compare", "--probe", str(path), "--threads", str(threads),
           "--new-tokens", str(new_tokens), "--runs", str(runs), "--prompt", prompt]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       preexec_fn=(lambda: os.nice(nice)) if nice else None)
    if r.returncode != 0:
        raise RuntimeError(f"probe of {path} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- report (parent)
def param_breakdown(path: str | Path) -> dict[str, int]:
    """Parameters by role from the safetensors headers (no weights loaded): embedding/head, attention, MLP, other."""
    from safetensors import safe_open

    cfg = json.loads((Path(path) / "config.json").read_text())
    out = {"embed_head": 0, "attention": 0, "mlp": 0, "norm_other": 0}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                n = 1
                for d in sf.get_slice(k).get_shape():
                    n *= d
                if "embed_tokens" in k or k.startswith("lm_head"):
                    out["embed_head"] += n
                elif ".mlp." in k:
                    out["mlp"] += n
                elif "self_attn" in k:
                    out["attention"] += n
                else:
                    out["norm_other"] += n
    out["tied_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
    return out


def compare(dense: str | Path, slim: str | Path, *, threads: int = 1, new_tokens: int = 64, rounds: int = 3,
            runs: int = 3, prompt: str = PROMPT, nice: int = 0, progress: bool = True) -> dict[str, Any]:
    """Interleaved fresh-process probes of ``dense`` and ``slim``; returns the comparison report."""
    m0 = machine()
    probes: dict[str, list[dict[str, Any]]] = {"dense": [], "slim": []}
    for r in range(rounds):
        for which, path in (("dense", dense), ("slim", slim)):
            res = probe(path, threads=threads, new_tokens=new_tokens, runs=runs, prompt=prompt, nice=nice)
            probes[which].append(res)
            if progress:
                print(f"[compare] round {r + 1}/{rounds} {which}: {res['tok_s']} tok/s, "
                      f"peak RSS {res['peak_rss_mb']} MB, load avg {res['loadavg'][0]}", flush=True)
    m1 = machine()

    def med(which: str, key: str) -> float:
        return statistics.median(p[key] for p in probes[which])

    d, s = probes["dense"][0], probes["slim"][0]
    dense_tok_s, slim_tok_s = med("dense", "tok_s"), med("slim", "tok_s")
    ratio = d["params"] / s["params"]
    speedup = slim_tok_s / dense_tok_s
    dense_parts, slim_parts = param_breakdown(dense), param_breakdown(slim)
    return {
        "dense_dir": str(dense), "slim_dir": str(slim),
        "dense_params": d["params"], "slim_params": s["params"], "param_ratio": round(ratio, 4),
        "dense_bytes": d["bytes"], "slim_bytes": s["bytes"], "bytes_ratio": round(d["bytes"] / s["bytes"], 4),
        "dense_peak_rss_mb": med("dense", "peak_rss_mb"), "slim_peak_rss_mb": med("slim", "peak_rss_mb"),
        "dense_peak_rss_after_load_mb": med("dense", "peak_rss_after_load_mb"),
        "slim_peak_rss_after_load_mb": med("slim", "peak_rss_after_load_mb"),
        "dense_rss_increase_mb": med("dense", "rss_increase_mb"),
        "slim_rss_increase_mb": med("slim", "rss_increase_mb"),
        "dense_tok_s": dense_tok_s, "slim_tok_s": slim_tok_s,
        "dense_decode_tok_s": med("dense", "decode_tok_s"), "slim_decode_tok_s": med("slim", "decode_tok_s"),
        "dense_tok_per_cpu_s": med("dense", "tok_per_cpu_s"), "slim_tok_per_cpu_s": med("slim", "tok_per_cpu_s"),
        "cpu_time_speedup": round(med("slim", "tok_per_cpu_s") / med("dense", "tok_per_cpu_s"), 4),
        "speedup": round(speedup, 4), "decode_speedup": round(med("slim", "decode_tok_s") / med("dense", "decode_tok_s"), 4),
        "target_speedup": round(0.9 * ratio, 4), "target_met": speedup >= 0.9 * ratio,
        "param_breakdown": {"dense": dense_parts, "slim": slim_parts},
        "settings": {"threads": threads, "new_tokens": new_tokens, "rounds": rounds, "runs_per_probe": runs,
                     "prompt": prompt, "dtype": "float32", "batch": 1, "decoding": "greedy, EOS suppressed",
                     "tok_s": "new tokens / median wall time of one generate() call (includes the prompt's prefill)",
                     "decode_tok_s": "(new_tokens - 1) / (median generate(new_tokens) - median generate(1))",
                     "tok_per_cpu_s": "new tokens / median CPU time (process_time) of one generate() call: less "
                                      "sensitive than wall time to other processes competing for the cores",
                     "peak_rss": "VmHWM of the fresh process after loading the model and one warm-up generate() "
                                 "(transformers maps safetensors lazily, so right after loading most weight pages "
                                 "are not resident yet: peak_rss_after_load is recorded too). Includes the torch "
                                 "and transformers imports; rss_increase = peak minus VmHWM after importing torch. "
                                 "ru_maxrss is recorded per probe but Linux carries the launching process's peak "
                                 "into it over fork+exec"},
        "machine": {**m0, "loadavg_end": m1["loadavg"], "busy": m0["busy"] or m1["busy"],
                    "torch_threads": threads},
        "probes": probes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dense", nargs="?")
    ap.add_argument("slim", nargs="?")
    ap.add_argument("--out")
    ap.add_argument("--probe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", default=PROMPT)
    a = ap.parse_args(argv)
    if a.probe:
        print(json.dumps(_probe(a.probe, a.threads, a.new_tokens, a.runs, a.prompt)))
        return 0
    if not (a.dense and a.slim):
        ap.error("give DENSE_DIR and SLIM_DIR (or --probe DIR)")
    rep = compare(a.dense, a.slim, threads=a.threads, new_tokens=a.new_tokens, rounds=a.rounds, runs=a.runs,
                  prompt=a.prompt)
    text = json.dumps(rep, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
