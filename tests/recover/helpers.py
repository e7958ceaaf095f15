"""A tiny teacher / pruned-student pair with a word-level tokenizer and text files, for the recover tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fbnprune.arch import get_adapter
from fbnprune.evaluate import next_token_agreement
from fbnprune.recover import RecoverConfig
from tests.conftest import make_tiny_env, tiny_model, word_tokenizer


def env(root: Path) -> Path:
    """``root`` with ``calib.txt`` (training text) and ``eval.txt`` (held out), see :func:`make_tiny_env`."""
    return make_tiny_env(root)


def pair(model_type: str = "llama", keep_every: int = 2, bias: bool = True):
    """(teacher, student): a tiny random model and a copy with every ``keep_every``-th MLP neuron kept, sliced;
    with ``bias`` the student's first down projection gets a bias (as bias compensation adds)."""
    teacher = tiny_model(model_type)
    student = copy.deepcopy(teacher)
    adapter = get_adapter(student)
    for i, mlp in enumerate(adapter.mlps(student)):
        if bias and i == 0 and adapter.bias_key is not None:
            adapter.add_down_bias_(mlp, torch.linspace(-0.5, 0.5, student.config.hidden_size))
        width = adapter.width(mlp)
        adapter.slice_(mlp, torch.arange(0, width, keep_every + i))  # layers of different widths
    if bias and adapter.bias_key == "mlp_bias":
        student.config.mlp_bias = True
    return teacher, student


def config(root: Path, **kw) -> RecoverConfig:
    """Settings for a few-second run on ``root/calib.txt``."""
    base = dict(data=[str(root / "calib.txt")], seq_len=32, batch_size=4, max_tokens=4 * 32 * 12, lr=3e-3,
                warmup=0.0)
    base.update(kw)
    return RecoverConfig(**base)


def held_out(root: Path, n: int = 16) -> list[torch.Tensor]:
    from fbnprune.collect import make_sequences

    return make_sequences(word_tokenizer(), str(root / "eval.txt"), n_tokens=32 * n, seq_len=32, seed=5).sequences


def kl(teacher, student, seqs) -> float:
    return next_token_agreement(teacher, student, seqs, progress=False)["kl"]
