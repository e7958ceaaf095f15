"""Slim tiny models and a separate-process logits probe shared by the export tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from fbnprune.arch import get_adapter
from fbnprune.prune import ScoreContext, apply_plan_, make_plan, score_neurons
from tests.conftest import tiny_model

INPUT = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200, 3, 7, 11, 13]])


def slim_model(model_type: str, allocation: str = "uniform", bias: bool = False, sparsity: float = 0.3,
               seed: int = 0) -> tuple[Any, Any]:
    """A tiny random model pruned by random scores; ``bias`` adds a non-zero compensation-style down bias."""
    model = tiny_model(model_type, seed=seed)
    adapter = get_adapter(model)
    scores = score_neurons("random", ScoreContext(model=model, adapter=adapter, seed=seed))
    if allocation == "global":  # skew one layer so the global ranking gives visibly different widths
        scores[1] = scores[1] ** 6
    plan = make_plan(scores, sparsity=sparsity, allocation=allocation, round_to=8, min_width=8)
    plan.info["method"] = "random"
    if allocation == "global":
        assert not plan.uniform, plan.kept_widths
    if bias:
        g = torch.Generator().manual_seed(seed + 1)
        for mlp in adapter.mlps(model):
            adapter.add_down_bias_(mlp, torch.randn(adapter.down_weight(mlp).shape[0], generator=g))
        if adapter.can_export_bias():
            adapter.enable_config_bias(model.config)
    apply_plan_(model, plan, mode="slice")
    return model.eval(), plan


@torch.no_grad()
def logits(model: Any) -> torch.Tensor:
    return model(INPUT).logits.float()


_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    path, out, how = sys.argv[1], sys.argv[2], sys.argv[3]
    if how == "stock":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        import fbnprune
        model = fbnprune.load_pretrained(path)
    model.eval()
    ids = torch.tensor(json.loads(sys.argv[4]))
    with torch.no_grad():
        torch.save(model(ids).logits.float(), out)
    print(json.dumps({"fbnprune_imported": any(m == "fbnprune" or m.startswith("fbnprune.") for m in sys.modules)}))
    """
)


def reload_logits(export_dir: Path, how: str, tmp: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load ``export_dir`` in a fresh interpreter (``stock`` = transformers only) and return its logits."""
    out = tmp / f"logits-{how}.pt"
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, str(export_dir), str(out), how, json.dumps(INPUT.tolist())],
        capture_output=True, text=True, timeout=300, cwd=tmp,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if r.returncode != 0:
        raise AssertionError(f"reload failed ({how}):\n{r.stderr[-3000:]}")
    return torch.load(out), json.loads(r.stdout.strip().splitlines()[-1])


def tiny_tokenizer() -> Any:
    """A word-level fast tokenizer over the tiny vocab, so tokenizer files are part of the export."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(256)}
    vocab["[UNK]"] = 0
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w1", bos_token="w2")
