"""Regenerate the leaderboard's grid recipes under benchmarks/leaderboard/grid/<model>/ (after changing the grid or
the defaults).

One recipe per model x method x sparsity (uniform widths, stock-loadable), plus fbn with global allocation, fbn
with bias compensation, the naive fbn rule (max |z|), the control of the fbn rule without networks, the baselines
with the compensation their authors pair them with, and Wanda-sp with fbn's own re-fit (the same rebuild after a
different selection). These recipes are the leaderboard's grid. Every recipe of a model shares the same calibration
settings (and keeps activations), so the cached activations and networks are computed once and reused by all.

They live with the benchmark, not in the package: a hundred generated per-method, per-sparsity files are the
grid's cells, not recipes a user picks from ``python -m fbnprune recipes``. Any of them still runs as a file:
``python -m fbnprune run benchmarks/leaderboard/grid/smollm2-135m/fbn-30.yaml``.

    python scripts/make_recipes.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent / "benchmarks" / "leaderboard" / "grid"
MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 x 1536 MLP neurons)",
    "gemma3-270m": "Gemma 3 270M (18 x 2048 MLP neurons)",
}
METHODS = {
    "fbn": "functional networks (remove what the networks can rebuild, then re-fit the rest: redundancy + refit)",
    "random": "random neurons (the floor)",
    "magnitude": "weight norms",
    "wanda_sp": "Wanda-sp (activation norm x down-column norm)",
    "flap": "FLAP fluctuation (activation variance x squared down-column norm)",
    "taylor": "first-order Taylor importance (LLM-Pruner)",
    "obs": "structured optimal brain surgeon (SlimGPT/ZipLM-style)",
    "corr_redundancy": "the fbn rule's control: neighbours by correlation instead of networks (+ refit)",
}
#: (tag, method, options): the variants besides one recipe per method
EXTRA = [
    ("fbn-global", "fbn", {"allocation": "global"}),
    ("fbn-bias", "fbn", {"compensate": "bias"}),
    ("fbn_maxz", "fbn", {"fbn_rule": "max_z"}),  # the naive rule of the reference code
    ("wanda_sp-refit", "wanda_sp", {"compensate": "refit"}),  # the baseline with fbn's own rebuild
    ("flap-bias", "flap", {"compensate": "bias"}),  # FLAP as published (fluctuation + bias compensation)
    ("obs-refit", "obs", {"compensate": "refit"}),  # OBS with the re-fit it assumes (SlimGPT/ZipLM)
    # layer by layer, each layer calibrated on the pruned layers' outputs (fbnprune.prune.sequential)
    ("obs-refit-seq", "obs", {"compensate": "refit", "sequential": True}),
    ("fbn-seq", "fbn", {"sequential": True}),
]
SPARSITIES = (0.1, 0.2, 0.3, 0.5)
TASKS = ["piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa"]


def recipe(model: str, method: str, sparsity: float, *, tag: str | None = None, allocation: str = "uniform",
           compensate: str | None = None, fbn_rule: str | None = None, sequential: bool = False) -> dict:
    from fbnprune.prune.compensate import default_compensation
    from fbnprune.prune.fbn import DEFAULT_RULE

    pct = round(sparsity * 100)
    rule = fbn_rule or DEFAULT_RULE
    comp = compensate or default_compensation(method, rule)
    what = METHODS[method] if rule == DEFAULT_RULE else f"functional-network scores (ICA, rule {rule}, the naive one)"
    desc = f"{model}: remove {pct}% of MLP neurons by {what}, {allocation} widths"
    if compensate is not None:
        desc += f", {comp} compensation"
    if sequential:
        desc += ", layer by layer (sequential)"
    prune: dict = {"method": method, "sparsity": sparsity, "allocation": allocation, "mode": "slice",
                   "compensate": comp, "protected_layers": []}
    if method == "fbn":
        prune["fbn_rule"] = rule
    if sequential:
        prune.update(sequential=True, refit_target="layer")
    r: dict = {
        "name": f"{model}-{tag or method}-{pct}",
        "description": desc,
        "model": {"source": model, "dtype": "float32"},
        "collect": {"source": "wikitext2-valid", "n_tokens": 8192, "seq_len": 512, "batch_size": 4, "seed": 0,
                    "keep_activations": True},
        # no protected layers: every method is measured as its authors publish it (FLAP, Wanda-sp), and the
        # committed leaderboard cells were made so; fbnprune's own default is protected_layers: auto
        "prune": prune,
        "evaluate": {
            "perplexity": [
                {"source": "wikitext2-test", "seq_len": 128, "max_tokens": 16384},
                {"source": "wikitext2-test", "seq_len": 2048, "max_tokens": 16384},
            ],
            "tasks": TASKS,
            "retention": {"source": "self", "n_tokens": 4096, "seq_len": 256, "seed": 1234},
        },
        "export": {"enabled": True},
    }
    if method in ("fbn", "corr_redundancy") or comp in ("netrefit", "corrrefit"):
        r["discover"] = {"method": "canica", "n_components": 128, "n_restarts": 10, "block_texts": None,
                         "block_rows": 2048, "threshold": 3.6}
    return r


def main() -> None:
    for model in MODELS:
        d = ROOT / model
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.yaml"):
            old.unlink()
        # FLAP ships as published, with its bias compensation (flap-bias), not as a bare score
        specs = [(m, m, {}) for m in METHODS if m != "flap"] + EXTRA
        for tag, method, kw in specs:
            for s in SPARSITIES:
                rec = recipe(model, method, s, tag=tag, **kw)
                (d / f"{rec['name'][len(model) + 1:]}.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    print(f"wrote {sum(1 for _ in ROOT.rglob('*.yaml'))} recipes under {ROOT}")


if __name__ == "__main__":
    main()
