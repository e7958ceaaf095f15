"""How fast can this machine push the suite's tokens through SmolLM2, and in which number format?

    python benchmarks/eval_suite/throughput.py [--threads 2] [--suite-tokens 1021715]

Measures, on the machine it runs on:
- one MLP-shaped matrix product (4096 x 576 by 576 x 1536, SmolLM2's up projection on a full batch) in fp32,
  bf16, fp16 and int8 dynamic quantisation, in GFLOP/s;
- the decoder forward pass on the packed engine's batch shape (8 rows of 512 tokens) in fp32 and bf16, in
  tokens/s.
The suite's work in packed tokens comes from ``count_tokens.py`` (its ``total.packed_tokens``); dividing it by
the fp32 decoder rate gives a lower bound on the suite's time here: the packed engine adds padding and the
output head on top, never less work.

Writes ``results/throughput.json`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import command_line, now, write_json  # noqa: E402


def _rate(fn: Callable[[], object], repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--suite-tokens", type=int, default=1_021_715,
                    help="packed tokens of the suite (count_tokens.py, total.packed_tokens)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from fbnprune.models import load_model
    from fbnprune.provenance import machine

    start_load = os.getloadavg()
    # --- one matrix product of the MLP's shape
    m, k, n = 4096, 576, 1536
    a, w = torch.randn(m, k), torch.randn(n, k)
    flop = 2 * m * k * n
    matmul: dict[str, float] = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        aa, ww = a.to(dt), w.to(dt)
        matmul[name] = flop / _rate(lambda aa=aa, ww=ww: torch.nn.functional.linear(aa, ww), 5) / 1e9
    lin = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    lin[0].weight.data.copy_(w)
    q = torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)
    matmul["int8_dynamic"] = flop / _rate(lambda: q(a), 5) / 1e9
    # --- the decoder on the packed engine's batch shape
    model = load_model("smollm2-135m").model.eval()
    ids = torch.randint(0, model.config.vocab_size, (8, 512))
    decoder_tps: dict[str, float] = {}
    with torch.no_grad():
        for name, dt, rows in (("float32", torch.float32, 8), ("bfloat16", torch.bfloat16, 2)):
            dec = model.to(dt).get_decoder()
            x = ids[:rows]
            decoder_tps[name] = x.numel() / _rate(lambda dec=dec, x=x: dec(input_ids=x, use_cache=False), 2)
    bound_min = args.suite_tokens / decoder_tps["float32"] / 60
    result = {
        "matmul_gflops": {k2: round(v, 1) for k2, v in matmul.items()},
        "matmul_shape": [m, k, n],
        "decoder_tokens_per_s": {k2: round(v, 1) for k2, v in decoder_tps.items()},
        "decoder_batch": {"float32": [8, 512], "bfloat16": [2, 512]},
        "suite_packed_tokens": args.suite_tokens,
        "suite_lower_bound_min_fp32": round(bound_min, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": machine(),
        "loadavg_at_start": [round(x, 2) for x in start_load],
        "python": platform.python_version(),
        "command": command_line(),
        "date": now(),
    }
    write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
