"""Memory and work of pruning a 7B and a 70B model with fbnprune, from the architectures' shapes: the numbers in
``docs/scale.md``, computed here so that they can be checked and recomputed for other settings.

    python benchmarks/distributed/scale.py                     # Markdown tables (Llama-2-7B, Llama-2-70B)
    python benchmarks/distributed/scale.py --tokens 131072 --ranks 8 --cpu-cores 16

Nothing is measured here except the one rate it takes from a measurement: a CPU core's float32 matmul rate,
from ``benchmarks/discovery_speed/results.json`` (the PCA Gram matrices of SmolLM2's 30 layers: FLOPs counted
below, seconds measured). float64 work (the obs and re-fit solves) is taken at half that rate. The GPU rate of a
forward pass is an assumption (``--gpu-tflops``, default 400: 40 % of an H100's 989 dense bf16 TFLOP/s).

FLOP counts (``n`` MLP neurons per layer, ``d`` hidden size, ``L`` layers, ``N`` calibration tokens, ``k`` ICA
components, ``R`` restarts, ``T_b`` rows per discovery block):

* forward pass: ``2 P`` per token (``P`` parameters without the embedding table) plus attention ``2 L d T`` per
  token for windows of ``T`` (causal: half of ``4 L d T``);
* Gram of a layer: ``2 N n^2`` (float32 products, summed in float64);
* obs scoring of a layer: ``2 n^2 d`` once, then per elimination round with ``m`` neurons alive a Cholesky
  factor and inverse (``m^3``) and the re-fitted weights (``2 m^2 d``), ``obs_steps + 1`` rounds;
* refit of a layer: Cholesky solve on the ``k_l`` kept neurons, ``k_l^3 / 3 + 2 k_l^2 d``;
* discovery, per layer and run: PCA Gram ``2 n T_b min(n, T_b)``, ICA ``4 k^2 n R`` per iteration (55 iterations,
  the mean measured on SmolLM2).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Arch:
    """The shapes that set memory and FLOPs (public configs)."""

    name: str
    d: int
    n: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def layer_params(self) -> int:
        hd = self.d // self.heads
        attn = 2 * self.d * self.d + 2 * self.d * self.kv_heads * hd
        return attn + 3 * self.d * self.n

    @property
    def params(self) -> int:  # decoder layers, embedding and untied output head
        return self.layers * self.layer_params + 2 * self.vocab * self.d


LLAMA2_7B = Arch("Llama-2-7B", d=4096, n=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
LLAMA2_70B = Arch("Llama-2-70B", d=8192, n=28672, layers=80, heads=64, kv_heads=8, vocab=32000)

GB = 1e9


def cpu_rate_per_core() -> float:
    """float32 FLOP/s per core, from the measured PCA Gram time of benchmarks/discovery_speed (SmolLM2)."""
    res = json.loads((HERE.parent / "discovery_speed" / "results.json").read_text())
    n, layers, rows = res["neurons_per_layer"], res["layers"], res["rows"]
    k = res["components"]
    pca_iters = res["fbnprune"]["config"]["pca_iters"]
    m = min(n, rows)
    flops = layers * (2 * rows * n * m + 2 * m * m * (k + 10) * (pca_iters + 1))
    return flops / res["fbnprune"]["timing_s"]["pca_s"] / res["machine"]["threads_used"]


def obs_flops(n: int, d: int, sparsity: float, steps: int = 10) -> float:
    drop = round(n * sparsity)
    alive = [n - round(drop * t / steps) for t in range(steps)] + [n - drop]
    return 2 * n * n * d + sum(m**3 + 2 * m * m * d for m in alive)


def estimate(a: Arch, *, tokens: int, seq_len: int, sparsity: float, ranks: int, gpu_tflops: float,
             cpu_cores: int, block_rows: int, runs: int, k: int = 128, restarts: int = 10, iters: int = 55,
             bytes_per_weight: int = 2) -> dict[str, float]:
    core = cpu_rate_per_core()
    cpu32 = core * cpu_cores  # one rank's CPU cores
    cpu64 = cpu32 / 2
    p_no_emb = a.layers * a.layer_params + a.vocab * a.d  # the output head is a matmul per token
    fwd_tok = 2 * p_no_emb + 2 * a.layers * a.d * seq_len
    kept = round(a.n * (1 - sparsity))
    f = {
        "collect_fwd": tokens * fwd_tok,
        "gram": a.layers * 2 * tokens * a.n**2,
        "obs": a.layers * obs_flops(a.n, a.d, sparsity),
        "refit": a.layers * (kept**3 / 3 + 2 * kept**2 * a.d),
        "pca": a.layers * runs * 2 * a.n * block_rows * min(a.n, block_rows),
        "ica": a.layers * runs * 4 * k * k * a.n * restarts * iters,
        "seq_fwd": 3 * tokens * (fwd_tok - 2 * a.vocab * a.d),  # each layer on pruned and dense inputs, then pruned
        "cross_gram": a.layers * 2 * tokens * a.n * a.d,
    }
    # seconds. Parallel mode shares every stage out over the ranks (batches, or layers: obs and refit with their
    # Grams). Sequential mode has one layer at a time: its forwards, Gram and cross-Gram are shared out, its obs
    # and refit solves are computed by every rank (replicated)
    gpu = gpu_tflops * 1e12
    t = {
        "collect": f["collect_fwd"] / gpu / ranks,
        "gram": f["gram"] / cpu32 / ranks,
        "obs": f["obs"] / cpu64 / ranks,
        "refit": f["refit"] / cpu64 / ranks,
        "discover": (f["pca"] + f["ica"]) / cpu32 / ranks,
        "seq_fwd": f["seq_fwd"] / gpu / ranks,
        "seq_gram": (f["gram"] + f["cross_gram"]) / cpu32 / ranks,
        "seq_solves": (f["obs"] + f["refit"]) / cpu64,
    }
    w = bytes_per_weight
    tok_rank = tokens / ranks
    mem = {
        "weights_gb": a.params * w / GB,
        "layer_gb": a.layer_params * w / GB,
        "embed_head_gb": 2 * a.vocab * a.d * w / GB,
        "store_disk_gb": tokens * a.layers * a.n * 4 / GB,
        "gram_gb": (a.n + 1) ** 2 * 8 / GB,
        # sequential: the pruned and the dense hidden states of this rank's tokens (float32 by default: the model's
        # dtype), the layer's activations on both (float32 on CPU), rank 0 also all ranks' rows for the store
        "seq_hidden_gb": 2 * tok_rank * a.d * 4 / GB,
        "seq_acts_gb": 2 * tok_rank * a.n * 4 / GB,
        "seq_rank0_rows_gb": tokens * a.n * 4 / GB,
    }
    return {**{f"flops_{k_}": v for k_, v in f.items()}, **{f"s_{k_}": v for k_, v in t.items()}, **mem,
            "cpu_gflops_core": core / 1e9}


def table(args: argparse.Namespace) -> str:
    rows = []
    for a in (LLAMA2_7B, LLAMA2_70B):
        for ranks in sorted({1, args.ranks}):
            e = estimate(a, tokens=args.tokens, seq_len=args.seq_len, sparsity=args.sparsity, ranks=ranks,
                         gpu_tflops=args.gpu_tflops, cpu_cores=args.cpu_cores, block_rows=args.block_rows,
                         runs=args.runs)
            rows.append((a, ranks, e))
    core = rows[0][2]["cpu_gflops_core"]
    out = [f"Calibration {args.tokens:,} tokens in windows of {args.seq_len}; sparsity {args.sparsity:.0%}; "
           f"{args.cpu_cores} CPU cores per rank at {core:.1f} GFLOP/s each (float32; float64 at half); GPU "
           f"forward at {args.gpu_tflops:g} TFLOP/s; discovery {args.runs} runs of {args.block_rows} rows, k=128, "
           "10 restarts, 55 iterations.", "",
           "| model | params | weights (bf16) | one layer | Gram (fp64) | store on disk (fp32) |",
           "|---|---:|---:|---:|---:|---:|"]
    for a, ranks, e in rows:
        if ranks == 1:
            out.append(f"| {a.name} | {a.params / 1e9:.2f} B | {e['weights_gb']:.1f} GB | {e['layer_gb']:.2f} GB | "
                       f"{e['gram_gb']:.2f} GB | {e['store_disk_gb']:,.0f} GB |")
    out += ["", "| model | ranks | sequential: hidden states per rank | layer activations per rank | rank 0 rows |",
            "|---|---:|---:|---:|---:|"]
    for a, ranks, e in rows:
        out.append(f"| {a.name} | {ranks} | {e['seq_hidden_gb']:.1f} GB | {e['seq_acts_gb']:.1f} GB | "
                   f"{e['seq_rank0_rows_gb']:.1f} GB |")
    def hms(s: float) -> str:
        return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")

    out += ["", "Parallel mode (the whole model on every rank):", "",
            "| model | ranks | collect forward | Grams | obs scoring | refit | discovery (fbn) | total |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for a, ranks, e in rows:
        parts = [e[k] for k in ("s_collect", "s_gram", "s_obs", "s_refit", "s_discover")]
        out.append(f"| {a.name} | {ranks} | " + " | ".join(hms(x) for x in parts) + f" | {hms(sum(parts))} |")
    out += ["", "Sequential mode (obs + dense-target refit, one layer at a time):", "",
            "| model | ranks | forwards (3 per layer) | Grams and cross-Grams | obs and refit solves (every rank) | "
            "total |", "|---|---:|---:|---:|---:|---:|"]
    for a, ranks, e in rows:
        parts = [e[k] for k in ("s_seq_fwd", "s_seq_gram", "s_seq_solves")]
        out.append(f"| {a.name} | {ranks} | " + " | ".join(hms(x) for x in parts) + f" | {hms(sum(parts))} |")
    out += ["", "| model | forward (PFLOP) | Grams | obs | refit | PCA | ICA | sequential forwards | cross-Grams |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for a, ranks, e in rows:
        if ranks == 1:
            out.append("| " + a.name + " | " + " | ".join(f"{e['flops_' + k] / 1e15:.2f}" for k in (
                "collect_fwd", "gram", "obs", "refit", "pca", "ica", "seq_fwd", "cross_gram")) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128 * 2048, help="calibration tokens (default 128 x 2048)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--gpu-tflops", type=float, default=400.0)
    ap.add_argument("--cpu-cores", type=int, default=16, help="CPU cores per rank")
    ap.add_argument("--block-rows", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=16, help="discovery runs (discover.n_runs)")
    print(table(ap.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
