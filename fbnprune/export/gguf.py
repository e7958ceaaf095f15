"""GGUF export of uniform slim Llama-family models, for llama.cpp and Ollama users.

The file is written with the ``gguf`` package's :class:`GGUFWriter` in ``f32`` or ``f16`` (1-D norm weights stay
``f32``, as llama.cpp expects). Tensor names follow gguf's own Llama name map; q/k projection rows are put into
llama.cpp's rotary layout (transformers' GGUF loader undoes exactly this on load). Tokenizer metadata
(``tokenizer.*``) is copied from the source GGUF when the model came from one (the built-ins do); without it
transformers can still load the weights but llama.cpp cannot tokenise, and a warning says so.

:func:`verify_gguf` loads the written file back through transformers' GGUF loader and compares logits with the
in-memory model rounded to the file's precision, so the check is free of quantisation error.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fbnprune.errors import UserError

log = logging.getLogger(__name__)

GGUF_ARCHS = {"llama": "llama"}  # HF model_type -> GGUF architecture written
_DTYPES = {"f32": np.float32, "f16": np.float16}


def _rope_theta(config: Any) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise UserError(f"GGUF export supports plain RoPE only (this model uses {rp.get('rope_type')!r})")
    theta = rp.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise UserError("cannot find rope_theta in the config")
    return float(theta)


def _to_llamacpp_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from HF's half-split rotary layout to llama.cpp's interleaved pairs.

    Per head, HF row ``i`` (first half) and ``i + d/2`` (second half) form a rotary pair; llama.cpp expects them at
    rows ``2i`` and ``2i + 1``.
    """
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _copy_tokenizer_metadata(writer: Any, source: str | Path) -> int:
    """Copy every ``tokenizer.*`` key of ``source`` (a GGUF file) into ``writer``; returns how many were copied."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
        n += 1
    return n


def export_gguf(
    model: Any,
    path: str | Path,
    dtype: str = "f16",
    tokenizer_from: str | Path | None = None,
    name: str | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (uniform widths, Llama family, no MLP bias) to the GGUF file ``path``, atomically.

    Args:
        dtype: ``f16`` (half the size; matrices rounded to float16) or ``f32`` (exact).
        tokenizer_from: a GGUF file whose ``tokenizer.*`` metadata is copied (the source model's GGUF).
        name: ``general.name`` (default: the config's name or path).
        info: if given, filled with ``tokenizer_keys`` (how many ``tokenizer.*`` keys were copied) and ``tensors``.
    """
    from gguf import MODEL_ARCH, GGUFWriter, LlamaFileType, get_tensor_name_map

    from fbnprune.arch import get_adapter

    if dtype not in _DTYPES:
        raise UserError(f"unknown GGUF dtype {dtype!r}; choose f16 or f32 (quantise afterwards with llama.cpp)")
    cfg = model.config
    mt = cfg.model_type
    if mt not in GGUF_ARCHS:
        raise UserError(f"GGUF export supports {sorted(GGUF_ARCHS)} models; this one is {mt!r}")
    adapter = get_adapter(model)
    mlps = adapter.mlps(model)
    widths = {adapter.width(m) for m in mlps}
    if len(widths) != 1:
        raise UserError("GGUF export needs the same MLP width in every layer (allocation: uniform)")
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    if biases:
        raise UserError(f"GGUF export cannot carry biases ({biases[0]}, ...): transformers' GGUF loader has no "
                        "mlp_bias/attention_bias switch. Export without bias compensation for GGUF")
    width = widths.pop()
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    if head_dim * n_head != cfg.hidden_size:
        raise UserError("GGUF export needs head_dim * num_attention_heads == hidden_size for Llama")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = GGUFWriter(str(tmp), GGUF_ARCHS[mt])
        w.add_type("model")
        w.add_name(name or str(getattr(cfg, "_name_or_path", "") or mt) + "-fbnprune-slim")
        w.add_file_type(LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32)
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(width))
        w.add_head_count(int(n_head))
        w.add_head_count_kv(int(n_kv))
        w.add_rope_dimension_count(int(head_dim))
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(cfg.vocab_size))
        n_tok = _copy_tokenizer_metadata(w, tokenizer_from) if tokenizer_from else 0
        if not n_tok:
            log.warning("GGUF written without tokenizer metadata: transformers loads the weights, but llama.cpp and "
                        "Ollama need tokenizer.* keys (export from a GGUF source or pass tokenizer_from=)")

        names = get_tensor_name_map(MODEL_ARCH.LLAMA, int(cfg.num_hidden_layers))
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        for hf_name, t in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue
            base, suffix = hf_name.rsplit(".", 1)
            gname = names.get_name(base)
            if gname is None:
                raise UserError(f"no GGUF name for tensor {hf_name!r}")
            t = t.detach().float().cpu()
            if base.endswith("self_attn.q_proj"):
                t = _to_llamacpp_rotary(t, n_head)
            elif base.endswith("self_attn.k_proj"):
                t = _to_llamacpp_rotary(t, n_kv)
            arr = t.numpy().astype(_DTYPES[dtype] if t.dim() > 1 else np.float32)
            w.add_tensor(f"{gname}.{suffix}", np.ascontiguousarray(arr))
        if info is not None:
            info.update(tokenizer_keys=n_tok, tensors=sum(len(t) for t in w.tensors), dtype=dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@torch.no_grad()
def verify_gguf(model: Any, path: str | Path, input_ids: torch.Tensor, dtype: str = "f16") -> dict[str, float]:
    """Load ``path`` through transformers' GGUF loader and compare logits with ``model`` rounded to ``dtype``.

    Returns ``{"max_abs_diff", "max_abs_logit"}``. For ``f16`` the reference is the in-memory model with every
    matrix rounded to float16 (what the file holds), so any difference beyond float32 noise is a writer bug.
    """
    import copy

    from transformers import AutoModelForCausalLM

    path = Path(path)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ref = copy.deepcopy(model).float().eval()
    if dtype == "f16":
        for p in ref.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    a = ref(input_ids).logits
    b = loaded(input_ids).logits
    return {"max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max())}
