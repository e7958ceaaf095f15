"""Hugging Face export: ``model.safetensors`` + ``config.json`` + tokenizer + generation config + fbnprune files.

Two layouts, chosen from the model itself (never from what the caller hopes):

* **stock** — every layer has the same MLP width and any MLP bias can be expressed by a stock config switch
  (Llama's ``mlp_bias``). ``config.json`` carries the new ``intermediate_size``; stock
  ``AutoModelForCausalLM.from_pretrained`` loads it with no fbnprune import and no ``trust_remote_code``.
* **per-layer** — widths differ between layers, or a compensation bias exists that the architecture's config
  cannot express (Gemma 3). ``config.json`` keeps the dense width as the global ``intermediate_size`` and adds
  transformers' sparse ``per_layer_config`` overrides (``{"07": {"intermediate_size": 1024}}``) for every pruned
  layer. transformers 5.x round-trips these, but its Llama/Gemma 3 modeling code still builds every layer from
  the global value: a stock ``from_pretrained`` therefore *fails loudly* with
  ``AmbiguousGlobalPerLayerAttributeError`` instead of loading wrong shapes or silently dropping a bias.
  :func:`load_pretrained` builds each layer at its own width and then loads the weights.

Everything is written into a hidden temporary directory next to the target and renamed at the end, so an
interrupted export leaves no half-written model directory.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.export.card import model_card, networks_summary
from fbnprune.export.gguf import export_gguf
from fbnprune.provenance import versions

log = logging.getLogger(__name__)

MANIFEST = "fbnprune_export.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMAT_VERSION = 1


def atomic_dir(target: str | Path, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Run ``write(tmp_dir)`` and rename ``tmp_dir`` to ``target``; on any failure remove ``tmp_dir``."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise UserError(f"output directory exists: {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------------------------- layout
@dataclass
class ExportLayout:
    """What an export looks like and who can load it (written as ``fbnprune_export.json``)."""

    model_type: str
    width_key: str
    layer_widths: list[int]
    global_width: int  # the config's global width (dense width for per-layer exports)
    bias_layers: list[int]  # layers whose down projection has a bias
    loader: str  # "stock" | "fbnprune"
    reason: str  # why this loader (one sentence, shown in the model card)
    loaders: dict[str, str] = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return len(set(self.layer_widths)) == 1

    def per_layer_overrides(self) -> dict[int, dict[str, int]]:
        """Sparse transformers ``per_layer_config`` entries: only layers whose width differs from the global."""
        return {i: {self.width_key: w} for i, w in enumerate(self.layer_widths) if w != self.global_width}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(format="fbnprune-slim", format_version=FORMAT_VERSION, uniform=self.uniform)
        return d


def _dense_width(model: Any, adapter: Any, plan: Any = None) -> int | None:
    """The width the model had before pruning, when it can be known."""
    if plan is not None:
        widths = plan["widths"] if isinstance(plan, dict) else plan.widths
        return max(int(w) for w in widths)
    w = getattr(model.config, "fbnprune_dense_width", None)
    return int(w) if w is not None else None


def describe_export(model: Any, plan: Any = None, require_stock: bool = False) -> ExportLayout:
    """Decide the export layout from the model's real tensor shapes (and the plan, for the dense width)."""
    adapter = get_adapter(model)
    mlps = adapter.mlps(model)
    widths = [adapter.width(m) for m in mlps]
    bias_layers = [i for i, m in enumerate(mlps) if adapter.down_bias(m) is not None]
    extra_bias = bool(bias_layers) and adapter.bias_key not in ("mlp_bias", "always")
    cfg_width = adapter.config_width(model.config)
    mt = model.config.model_type
    if len(set(widths)) == 1 and not extra_bias:
        return ExportLayout(
            model_type=mt, width_key=adapter.width_key, layer_widths=widths, global_width=widths[0],
            bias_layers=bias_layers, loader="stock",
            reason="every layer has the same MLP width, so a stock config describes the model",
            loaders={"transformers.AutoModelForCausalLM.from_pretrained": "yes (no trust_remote_code)",
                     "fbnprune.load_pretrained": "yes"},
        )
    if len(set(widths)) > 1:
        reason = "MLP widths differ between layers; stock modeling code builds every layer at one width"
        dense = max(cfg_width, max(widths))
    else:
        reason = (f"bias compensation added an MLP bias, and the {mt} config has no switch for one; a stock "
                  "loader would silently drop it")
        dense = _dense_width(model, adapter, plan) or cfg_width
        if dense == widths[0]:
            raise UserError(
                f"cannot write a fail-safe per-layer export of this {mt} model: the dense MLP width is unknown "
                "(pass plan= so the config can keep the dense width as its global value)"
            )
    if require_stock:
        raise UserError(f"this model cannot be exported for stock transformers: {reason}. "
                        "Use allocation 'uniform' (and no bias compensation on architectures without an MLP-bias "
                        "switch), or drop require_stock to get the per-layer export loaded by fbnprune.load_pretrained")
    return ExportLayout(
        model_type=mt, width_key=adapter.width_key, layer_widths=widths, global_width=dense,
        bias_layers=bias_layers, loader="fbnprune", reason=reason,
        loaders={
            "transformers.AutoModelForCausalLM.from_pretrained": (
                "no: raises AmbiguousGlobalPerLayerAttributeError (transformers' Llama/Gemma modeling code does "
                "not consume per_layer_config yet); the config is forward compatible for when it does"),
            "fbnprune.load_pretrained": "yes",
        },
    )


# --------------------------------------------------------------------------------------------- export
def _rewrite_config(path: Path, layout: ExportLayout, bias_switch: bool) -> None:
    """Turn the saved ``config.json`` into the layout's config (per-layer overrides, bias switch, no fbnprune keys)."""
    cfg = json.loads(path.read_text())
    for k in [k for k in cfg if k.startswith("fbnprune_")]:
        del cfg[k]
    cfg[layout.width_key] = layout.global_width
    if bias_switch:
        cfg["mlp_bias"] = True
    overrides = layout.per_layer_overrides()
    if layout.loader == "fbnprune":
        if not overrides:  # a per-layer export must never look stock-loadable
            raise UserError("internal: per-layer export without overrides would load silently wrong")
        digits = len(str(max(overrides)))
        cfg["per_layer_config"] = {str(i).zfill(digits): o for i, o in overrides.items()}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_hf(
    model: Any,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    extra_json: dict[str, Any] | None = None,
    extra_text: dict[str, str] | None = None,
    max_shard_size: str = "2GB",
    plan: Any = None,
    recipe_text: str | None = None,
    provenance: dict[str, Any] | None = None,
    results: dict[str, Any] | None = None,
    networks: dict[str, list[list[int]]] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    require_stock: bool = False,
    gguf: str | None = None,
    gguf_tokenizer_from: str | Path | None = None,
    report: dict[str, Any] | None = None,
) -> Path:
    """Save a sliced ``model`` and its ``tokenizer`` to ``out_dir`` atomically, with manifest, card and provenance.

    Args:
        extra_json / extra_text: more files to write next to the model (``name -> object / text``).
        plan: the :class:`~fbnprune.prune.plan.KeepPlan` (or its JSON) used; gives kept indices for the networks
            summary and the dense width. Taken from ``extra_json["fbnprune_keep_plan.json"]`` when not given.
        recipe_text: resolved recipe YAML (else ``extra_text["fbnprune_recipe.yaml"]``).
        provenance: run provenance (seeds, data hashes, model identity); versions are added here.
        results: the run's ``results`` dict (dense vs pruned metrics) for the model card's retention table.
        networks: ``{network_name: [neuron indices of layer 0, of layer 1, ...]}`` in dense indexing.
        require_stock: raise instead of falling back to the per-layer layout.
        gguf: also write ``model-<gguf>.gguf`` (``"f16"`` or ``"f32"``; uniform Llama or Gemma 3).
        report: a :func:`fbnprune.run.run` report; fills ``results``, ``provenance`` and the calibration data hash.

    Returns the export directory. The chosen layout is logged, stored in ``fbnprune_export.json`` and stated in
    the model card, so a fallback is never silent.
    """
    # imported here, not with the module: loading an export (load_pretrained) should not import the prune stage
    from fbnprune.prune.plan import count_params

    extra_json = dict(extra_json or {})
    extra_text = dict(extra_text or {})
    if report is not None:
        results = results if results is not None else report.get("results")
        provenance = provenance if provenance is not None else report.get("provenance")
    plan = plan if plan is not None else extra_json.get("fbnprune_keep_plan.json")
    recipe_text = recipe_text if recipe_text is not None else extra_text.get("fbnprune_recipe.yaml")
    provenance = dict(provenance if provenance is not None else extra_json.get("fbnprune_provenance.json") or {})
    adapter = get_adapter(model)
    layout = describe_export(model, plan=plan, require_stock=require_stock)
    bias_switch = bool(layout.bias_layers) and adapter.bias_key == "mlp_bias"
    if layout.loader == "fbnprune":
        log.warning("per-layer export (%s): load it with fbnprune.load_pretrained(); stock transformers refuses it",
                    layout.reason)
        print(f"[fbnprune] export: {layout.reason}; writing per_layer_config + manifest "
              "(load with fbnprune.load_pretrained)", flush=True)
    if gguf is not None and layout.loader != "stock":
        raise UserError(f"GGUF export needs a stock-loadable model ({layout.reason})")

    model_info = provenance.get("model") or {}
    base_model = base_model or model_info.get("base_model")
    license = license or model_info.get("license")
    provenance.setdefault("versions", {}).update(versions())
    calib = (report or {}).get("calibration") or {}
    if calib.get("sha256"):
        provenance.setdefault("data_hashes", {})[f"calibration:{calib.get('source')}"] = calib["sha256"]
    manifest = layout.to_json()
    manifest["params"] = count_params(model)
    manifest["compensation"] = getattr(model.config, "fbnprune_compensation", None)
    manifest["dense_params"] = (results or {}).get("dense", {}).get("params")
    summary = networks_summary(layout.layer_widths, plan, networks)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        _rewrite_config(tmp / "config.json", layout, bias_switch)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe_text is not None:
            extra_text["fbnprune_recipe.yaml"] = recipe_text
        extra_json["fbnprune_provenance.json"] = provenance
        extra_json["fbnprune_networks.json"] = summary
        extra_json[MANIFEST] = manifest
        if gguf is not None:
            ginfo: dict[str, Any] = {}
            gpath = export_gguf(model, tmp / f"model-{gguf}.gguf", dtype=gguf,
                                tokenizer_from=gguf_tokenizer_from or model_info.get("gguf"), info=ginfo)
            manifest["gguf"] = gpath.name
            manifest["loaders"]["transformers from_pretrained(dir, gguf_file=...)"] = (
                f"yes ({gpath.name}; round trip checked by fbnprune's tests)")
            manifest["loaders"]["llama.cpp / Ollama"] = (
                f"expected ({gpath.name} is a standard llama GGUF with the source tokenizer), not run by fbnprune"
                if ginfo.get("tokenizer_keys") else
                f"no: {gpath.name} has no tokenizer metadata (the model did not come from a GGUF file)")
        for name, obj in extra_json.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, default=str))
        for name, text in extra_text.items():
            (tmp / name).write_text(text)
        (tmp / "README.md").write_text(model_card(
            manifest=manifest, summary=summary, provenance=provenance, results=results,
            base_model=base_model, license=license, has_recipe=recipe_text is not None,
        ))

    out = atomic_dir(out_dir, write)
    log.info("exported %s (%s loader) to %s", layout.model_type, layout.loader, out)
    return out


# --------------------------------------------------------------------------------------------- hub
def _offline() -> bool:
    import os

    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def push_to_hub(export_dir: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str = "Upload fbnprune slim export") -> str:
    """Upload a finished export directory (model, card, manifest, provenance) to the Hugging Face Hub.

    Only when the user asks: fbnprune never uploads on its own, and tests never call this online. Raises
    :class:`UserError` when offline mode is set, the directory is not an export, or the upload fails.
    """
    export_dir = Path(export_dir)
    if read_manifest(export_dir) is None or not (export_dir / "README.md").is_file():
        raise UserError(f"{export_dir} is not an fbnprune export (no {MANIFEST} / README.md)")
    if "/" not in repo_id:
        raise UserError(f"repo_id must look like 'user/name', got {repo_id!r}")
    if _offline():
        raise UserError("push_to_hub needs the network, but HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, commit_message=commit_message,
                                 ignore_patterns=[".*"])
    except Exception as e:  # noqa: BLE001 - network/auth failures become one clear line
        raise UserError(f"push_to_hub to {repo_id!r} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


# --------------------------------------------------------------------------------------------- load
def read_manifest(path: str | Path) -> dict[str, Any] | None:
    """The export manifest of ``path``, or ``None`` for a plain Hugging Face directory."""
    p = Path(path) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else None


def _state_dict_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{path} holds no model.safetensors")
    return [single]


def load_pretrained(path: str | Path, dtype: Any = None, device: str = "cpu", **kwargs: Any) -> Any:
    """Load an fbnprune export: stock ones through ``from_pretrained``, per-layer ones layer by layer.

    For a per-layer export the model is built from the config with a small MLP in every layer, each MLP is then
    rebuilt at its own width (and given its bias where the checkpoint has one), and the safetensors weights are
    loaded strictly, so any mismatch raises. The returned model's config is the plain global config plus
    ``fbnprune_layer_widths``, exactly as right after pruning, so it can be evaluated or exported again.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model directory (no config.json)")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    manifest = read_manifest(path)
    if manifest is None or manifest.get("loader") == "stock":
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
        return model.to(device).eval()
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer fbnprune (format {manifest['format_version']})")

    from safetensors.torch import load_file
    from torch import nn
    from transformers.initialization import no_init_weights

    raw = json.loads((path / "config.json").read_text())
    raw.pop("per_layer_config", None)
    widths: list[int] = [int(w) for w in manifest["layer_widths"]]
    key = manifest["width_key"]
    cfg_cls = type(AutoConfig.for_model(raw["model_type"]))
    config = cfg_cls.from_dict(raw)
    small = cfg_cls.from_dict({**raw, key: min(widths)})
    if dtype is None:  # same default as from_pretrained: the dtype the checkpoint was saved in
        dtype = _DTYPES.get(str(raw.get("dtype") or raw.get("torch_dtype") or "float32"), torch.float32)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(small, dtype=dtype)
    adapter = get_adapter(model)
    bias_layers = set(manifest.get("bias_layers", []))
    for i, layer in enumerate(adapter.layers(model)):
        old = getattr(layer, adapter.mlp_attr)
        layer_cfg = cfg_cls.from_dict({**raw, key: widths[i]})
        with no_init_weights():
            new = type(old)(layer_cfg)
        down = adapter.down_module(new)
        if i in bias_layers and down.bias is None:
            down.bias = nn.Parameter(torch.zeros(down.weight.shape[0], dtype=down.weight.dtype))
        setattr(layer, adapter.mlp_attr, new.to(adapter.down_module(old).weight.dtype))
    state: dict[str, torch.Tensor] = {}
    for f in _state_dict_files(path):
        state.update(load_file(str(f)))
    expected = set(model.state_dict())
    tied = {k for k in expected - set(state) if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    missing = expected - set(state) - tied
    unexpected = set(state) - expected
    if missing or unexpected:
        raise UserError(f"checkpoint does not match the per-layer model: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.config = config
    model.config.fbnprune_layer_widths = widths
    return model.to(device).eval()


__all__ = ["ExportLayout", "atomic_dir", "describe_export", "export_hf", "load_pretrained", "push_to_hub",
           "read_manifest"]
