"""GGUF export of uniform slim Llama and Gemma 3 models, for llama.cpp and Ollama users.

The file is written with the ``gguf`` package's :class:`GGUFWriter` in ``f32`` or ``f16`` (1-D norm weights stay
``f32``, as llama.cpp expects). Tensor names follow gguf's own name map of the architecture. Two conventions of
llama.cpp's converters are applied, and transformers' GGUF loader undoes exactly these on load: Llama q/k
projection rows go into llama.cpp's interleaved rotary layout; Gemma RMSNorm weights are stored as ``1 + w``.
Architecture hyperparameters (``<arch>.*``) are copied from the source GGUF when there is one (so keys llama.cpp
needs and transformers ignores survive), with the new ``feed_forward_length``; otherwise they come from the
config. Tokenizer metadata
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

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError

log = logging.getLogger(__name__)

GGUF_ARCHS = {"llama": "llama", "gemma3_text": "gemma3"}  # HF model_type -> GGUF architecture written
_DTYPES = {"f32": np.float32, "f16": np.float16}


def _rope_theta(config: Any) -> float:
    rp = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rp:  # Gemma 3: one set per attention type; GGUF's freq_base is the global one
        rp = rp["full_attention"] or {}
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


def _copy_metadata(writer: Any, source: str | Path, prefix: str, skip: tuple[str, ...] = ()) -> int:
    """Copy every ``prefix*`` key of ``source`` (a GGUF file) except ``skip`` into ``writer``; returns the count."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    n = 0
    for key, field in reader.fields.items():
        if not key.startswith(prefix) or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
        n += 1
    return n


def _source_arch(source: str | Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(source)).fields.get("general.architecture")
    return str(field.contents()) if field is not None else None


def _write_hparams(w: Any, cfg: Any, arch: str, width: int, head_dim: int) -> None:
    """Architecture keys from the config (when no source GGUF of the same architecture is at hand)."""
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(width))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(cfg.num_key_value_heads))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    if arch == "llama":
        w.add_rope_dimension_count(int(head_dim))
    else:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(int(cfg.sliding_window))


def export_gguf(
    model: Any,
    path: str | Path,
    dtype: str = "f16",
    tokenizer_from: str | Path | None = None,
    name: str | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (uniform widths, Llama or Gemma 3, no biases) to the GGUF file ``path``, atomically.

    Args:
        dtype: ``f16`` (half the size; matrices rounded to float16) or ``f32`` (exact).
        tokenizer_from: the source model's GGUF file: its ``tokenizer.*`` keys (and ``<arch>.*`` keys, when the
            architecture matches) are copied.
        name: ``general.name`` (default: the config's name or path).
        info: if given, filled with ``tokenizer_keys`` (how many ``tokenizer.*`` keys were copied), ``arch_keys``
            (how many architecture keys came from the source) and ``tensors``.
    """
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, LlamaFileType, get_tensor_name_map

    if dtype not in _DTYPES:
        raise UserError(f"unknown GGUF dtype {dtype!r}; choose f16 or f32 (quantise afterwards with llama.cpp)")
    cfg = model.config
    mt = cfg.model_type
    if mt not in GGUF_ARCHS:
        raise UserError(f"GGUF export supports {sorted(GGUF_ARCHS)} models; this one is {mt!r}")
    arch = GGUF_ARCHS[mt]
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
    if arch == "llama" and head_dim * n_head != cfg.hidden_size:
        raise UserError("GGUF export needs head_dim * num_attention_heads == hidden_size for Llama")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = GGUFWriter(str(tmp), arch)
        w.add_type("model")
        w.add_name(name or str(getattr(cfg, "_name_or_path", "") or mt) + "-fbnprune-slim")
        w.add_file_type(LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32)
        n_arch = 0
        if tokenizer_from and _source_arch(tokenizer_from) == arch:
            ff_key = f"{arch}.feed_forward_length"
            n_arch = _copy_metadata(w, tokenizer_from, f"{arch}.", skip=(ff_key,))
            w.add_feed_forward_length(int(width))
        else:
            _write_hparams(w, cfg, arch, width, head_dim)
        n_tok = _copy_metadata(w, tokenizer_from, "tokenizer.") if tokenizer_from else 0
        if not n_tok:
            log.warning("GGUF written without tokenizer metadata: transformers loads the weights, but llama.cpp and "
                        "Ollama need tokenizer.* keys (export from a GGUF source or pass tokenizer_from=)")

        gg_arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
        names = get_tensor_name_map(MODEL_ARCH(gg_arch), int(cfg.num_hidden_layers))
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        for hf_name, t in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue
            base, suffix = hf_name.rsplit(".", 1)
            gname = names.get_name(base)
            if gname is None:
                raise UserError(f"no GGUF name for tensor {hf_name!r}")
            t = t.detach().float().cpu()
            if arch == "llama" and base.endswith("self_attn.q_proj"):
                t = _to_llamacpp_rotary(t, n_head)
            elif arch == "llama" and base.endswith("self_attn.k_proj"):
                t = _to_llamacpp_rotary(t, n_kv)
            elif arch == "gemma3" and gname.endswith("norm"):
                t = _gemma_norm_to_gguf(t)
            arr = t.numpy().astype(_DTYPES[dtype] if t.dim() > 1 else np.float32)
            w.add_tensor(f"{gname}.{suffix}", np.ascontiguousarray(arr))
        if info is not None:
            info.update(tokenizer_keys=n_tok, arch_keys=n_arch, tensors=sum(len(t) for t in w.tensors),
                        dtype=dtype, arch=arch)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _gemma_norm_to_gguf(w: torch.Tensor) -> torch.Tensor:
    """Gemma's RMSNorm multiplies by ``1 + w``; llama.cpp stores ``1 + w`` (transformers subtracts 1 on load)."""
    return w + 1.0


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
