"""Slim tiny models and a separate-process logits probe shared by the export tests."""

from __future__ import annotations

import json
import os
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
    jobs, ids = json.loads(sys.argv[1]), torch.tensor(json.loads(sys.argv[2]))
    info = []
    for path, out, how in jobs:  # stock jobs first: fbnprune must not be imported while they run
        if how == "stock":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            import fbnprune
            model = fbnprune.load_pretrained(path)
        with torch.no_grad():
            torch.save(model.eval()(ids).logits.float(), out)
        info.append({"fbnprune_imported": any(m == "fbnprune" or m.startswith("fbnprune.") for m in sys.modules)})
    print(json.dumps(info))
    """
)


def reload_many(jobs: list[tuple[Path, str]], tmp: Path) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Load each ``(export_dir, how)`` in ONE fresh interpreter (``stock`` = transformers only; put those first).

    One process for several exports keeps the suite fast; each model is still loaded from disk only.
    """
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][1] != "stock")
    if [jobs[i][1] for i in order] != [j[1] for j in jobs]:
        raise ValueError("list stock jobs first")
    spec = [(str(d), str(tmp / f"logits-{i}.pt"), how) for i, (d, how) in enumerate(jobs)]
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(spec), json.dumps(INPUT.tolist())],
        capture_output=True, text=True, timeout=600, cwd=tmp,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if r.returncode != 0:
        raise AssertionError(f"reload failed:\n{r.stderr[-3000:]}")
    infos = json.loads(r.stdout.strip().splitlines()[-1])
    return [(torch.load(out), info) for (_, out, _), info in zip(spec, infos, strict=True)]


def reload_logits(export_dir: Path, how: str, tmp: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load one export in a fresh interpreter and return its logits."""
    return reload_many([(export_dir, how)], tmp)[0]


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
