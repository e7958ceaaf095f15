"""How far the first position of a sequence stands out in each MLP: the attention sink the calibration store must keep.

    python benchmarks/fbn_rules/diagnostics/sink_activation.py [MODEL ...]     # default: both built-in models

For the study's calibration windows (wikitext2-valid, packed 512-token sequences, seed 0; each starts the way the
model's tokenizer starts a text, so position 0 is Gemma 3's <bos> and an ordinary token for SmolLM2), per layer: the norm of the MLP output (down projection) and of its input at position 0,
divided by the median norm over the other positions, averaged over the first 4 sequences. Writes
``sink_activation.json`` next to this file.

Why: a ratio in the hundreds means the MLP writes a massive activation at position 0, which attention then uses as
its sink. Statistics taken without that position never see the neurons that make it, so scorers may remove them
and a re-fit of the kept columns cannot reproduce it (docs/fbn-study.md, "The calibration was missing the attention sink").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import record, write_json  # noqa: E402
from fbnprune.arch import get_adapter  # noqa: E402
from fbnprune.collect import make_sequences  # noqa: E402
from fbnprune.models import load_model  # noqa: E402

N_SEQ = 4


def sink_ratios(name: str) -> dict[str, object]:
    lm = load_model(name, dtype="float32")
    model = lm.model.eval()
    adapter = get_adapter(model)
    seqs = make_sequences(lm.tokenizer, "wikitext2-valid", n_tokens=8192, seq_len=512, mode="pack",
                          seed=0).sequences[:N_SEQ]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [adapter.down_module(mlp).register_forward_hook(
        lambda _m, inp, out, i=i: seen.__setitem__(i, (inp[0].detach(), out.detach())))
        for i, mlp in enumerate(adapter.mlps(model))]
    try:
        with torch.no_grad():
            model(input_ids=torch.stack([torch.as_tensor(s) for s in seqs]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    def ratio(x: torch.Tensor) -> float:
        n = x.norm(dim=-1)  # (B, T)
        return float((n[:, 0] / n[:, 1:].median(dim=1).values).mean())

    out_r = [ratio(seen[i][1]) for i in sorted(seen)]
    in_r = [ratio(seen[i][0]) for i in sorted(seen)]
    top = max(range(len(out_r)), key=out_r.__getitem__)
    print(f"{name}: position-0 MLP output up to {out_r[top]:.0f}x the median token (layer {top})", flush=True)
    return {"model": name, "sequences": N_SEQ, "seq_len": 512, "output_ratio": out_r, "input_ratio": in_r,
            "max_output_ratio": out_r[top], "max_layer": top}


def main() -> None:
    models = sys.argv[1:] or ["smollm2-135m", "gemma3-270m"]
    torch.set_num_threads(1)
    write_json(Path(__file__).parent / "sink_activation.json", {**record(), "models": [sink_ratios(m) for m in models]},
               indent=1)


if __name__ == "__main__":
    main()
