"""Shared fixtures: a tiny random Llama with a real (local) tokenizer, and the data directory."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (from the local converted-model cache or the offline weight package)."""
    from fbnprune.models import load_model

    try:
        return load_model("smollm2-135m").tokenizer
    except Exception as e:  # pragma: no cover - machine without the model package
        pytest.skip(f"smollm2-135m tokenizer not available: {e}")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=4096,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def data_root():
    from fbnprune.paths import data_dir

    root = data_dir()
    if root is None or not (root / "piqa").is_dir():
        pytest.skip("data directory (../shared/data) not available")
    return root
