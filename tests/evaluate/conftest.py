"""Shared fixtures: SmolLM2's tokenizer, a tiny random Llama with its vocabulary, and the data directory.

Task-scoring tests need a real BPE tokenizer: lm-eval's context/continuation split and the offline task prompts
depend on how real text tokenizes. Tests that only need token ids use the root ``tiny_llama`` instead.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import require_builtin

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer; loading it loads the model, so only integration tests use it."""
    from fbnprune.models import load_model

    require_builtin("smollm2-135m")
    return load_model("smollm2-135m").tokenizer


@pytest.fixture(scope="session")
def smol_vocab_llama(tokenizer):
    """A 2-layer random Llama over SmolLM2's vocabulary, so real task text can be scored quickly."""
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
