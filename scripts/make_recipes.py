"""Regenerate the bundled recipes under fbnprune/recipes/<model>/ (run after changing the grid or defaults).

One recipe per model x method x sparsity (uniform widths, stock-loadable), plus fbn with global allocation and
fbn with bias compensation. Every recipe of a model shares the same calibration settings (and keeps activations),
so the cached activations and networks are computed once and reused by all of them.

    python scripts/make_recipes.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent / "fbnprune" / "recipes"
MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 x 1536 MLP neurons)",
    "gemma3-270m": "Gemma 3 270M (18 x 2048 MLP neurons)",
}
METHODS = {
    "fbn": "functional-network scores (ICA, max |z|)",
    "random": "random neurons (the floor)",
    "magnitude": "weight norms",
    "wanda_sp": "Wanda-sp (activation norm x down-column norm)",
    "flap": "FLAP fluctuation (activation variance x squared down-column norm)",
    "taylor": "first-order Taylor importance (LLM-Pruner)",
    "obs": "structured optimal brain surgeon (SlimGPT/ZipLM-style)",
}
SPARSITIES = (0.1, 0.2, 0.3, 0.5)
TASKS = ["piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa"]


def recipe(model: str, method: str, sparsity: float, *, allocation: str = "uniform", compensate: str = "none") -> dict:
    pct = round(sparsity * 100)
    tag = method + ("" if allocation == "uniform" else f"-{allocation}") + ("" if compensate == "none" else f"-{compensate}")
    desc = f"{model}: remove {pct}% of MLP neurons by {METHODS[method]}, {allocation} widths"
    if compensate != "none":
        desc += f", {compensate} compensation"
    r: dict = {
        "name": f"{model}-{tag}-{pct}",
        "description": desc,
        "model": {"source": model, "dtype": "float32"},
        "collect": {"source": "wikitext2-valid", "n_tokens": 8192, "seq_len": 512, "batch_size": 4, "seed": 0,
                    "keep_activations": True},
        # no protected layers: every method is measured as its authors publish it (FLAP, Wanda-sp), and the
        # committed leaderboard cells were made so; fbnprune's own default is protected_layers: auto
        "prune": {"method": method, "sparsity": sparsity, "allocation": allocation, "mode": "slice",
                  "compensate": compensate, "protected_layers": []},
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
    if method == "fbn":
        r["discover"] = {"method": "canica", "n_components": 128, "n_restarts": 10, "block_texts": None,
                         "block_rows": 2048, "threshold": 3.6}
    return r


def main() -> None:
    for model in MODELS:
        d = ROOT / model
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.yaml"):
            old.unlink()
        for method in METHODS:
            for s in SPARSITIES:
                rec = recipe(model, method, s)
                (d / f"{rec['name'][len(model) + 1:]}.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
        for s in SPARSITIES:
            for kw in ({"allocation": "global"}, {"compensate": "bias"}):
                rec = recipe(model, "fbn", s, **kw)
                (d / f"{rec['name'][len(model) + 1:]}.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    print(f"wrote {sum(1 for _ in ROOT.rglob('*.yaml'))} recipes under {ROOT}")


if __name__ == "__main__":
    main()
