"""Model card (``README.md`` with Hugging Face YAML front matter) and the networks summary of an export.

The card is generated only from facts the export holds (manifest, plan, results, provenance): it states which
loaders work for this export, the retention table, kept neurons per layer and the versions that produced it.
"""

from __future__ import annotations

import json
from typing import Any

import torch


def _plan_parts(plan: Any) -> tuple[list[int] | None, list[list[int]] | None, dict[str, Any]]:
    """(dense widths, kept indices per layer, info) from a KeepPlan or its JSON; Nones when unknown."""
    if plan is None:
        return None, None, {}
    if isinstance(plan, dict):
        keep = plan.get("keep")
        return list(plan["widths"]), ([list(k) for k in keep] if keep is not None else None), dict(plan.get("info", {}))
    return list(plan.widths), [k.tolist() for k in plan.keep], dict(plan.info)


def networks_summary(
    layer_widths: list[int], plan: Any = None, networks: dict[str, list[list[int]]] | None = None
) -> dict[str, Any]:
    """Kept neurons per layer and, when ``networks`` is given, how many members of each network survived.

    ``networks`` maps a network name to its member neurons per layer (dense indexing); a neuron may belong to
    several networks (ICA maps overlap), so counts are per network, not a partition.
    """
    dense, keep, info = _plan_parts(plan)
    if networks is not None and keep is None:
        raise ValueError("a networks summary needs the plan's kept indices")
    layers = []
    net_tot: dict[str, dict[str, int]] = {}
    for i, w in enumerate(layer_widths):
        row: dict[str, Any] = {"layer": i, "kept": w}
        if dense is not None:
            row["dense_width"] = dense[i]
            row["kept_fraction"] = round(w / dense[i], 4)
        if networks is not None and keep is not None:
            kept_set = set(keep[i])
            row["networks"] = {}
            for name, per_layer in networks.items():
                members = set(int(j) for j in per_layer[i]) if i < len(per_layer) else set()
                k = len(members & kept_set)
                row["networks"][name] = {"members": len(members), "kept": k}
                t = net_tot.setdefault(name, {"members": 0, "kept": 0})
                t["members"] += len(members)
                t["kept"] += k
        layers.append(row)
    out: dict[str, Any] = {
        "total_kept": sum(layer_widths),
        "total_dense": sum(dense) if dense is not None else None,
        "method": info.get("method"),
        "allocation": info.get("allocation"),
        "protected_layers": info.get("protected"),
        "layers": layers,
    }
    if networks is not None:
        out["networks"] = {n: {**t, "kept_fraction": round(t["kept"] / t["members"], 4) if t["members"] else None}
                           for n, t in net_tot.items()}
    else:
        out["networks"] = None
        out["note"] = "no functional-network map was given to the export (baseline scorer or not recorded)"
    return out


def networks_from_set(net_set: Any, run: int = 0) -> dict[str, list[list[int]]]:
    """Export-ready network map from a discovered :class:`fbnprune.discover.networks.NetworkSet`.

    ``union`` is the union rule (member of some network in some run, ``score > tau``); ``L{l}/net{c}`` is row ``c``
    of layer ``l``'s component maps in run ``run`` (components of every ICA window that contains the layer), so
    names are per layer: a component spanning several layers of one window appears once per layer.
    """
    n = int(net_set.n_layers)
    out: dict[str, list[list[int]]] = {
        "union": [torch.nonzero(m.bool()).flatten().tolist() for m in net_set.membership]
    }
    for layer in range(n):
        nets = net_set.networks(layer, run)
        for c in range(nets.shape[0]):
            members = torch.nonzero(nets[c]).flatten().tolist()
            if members:
                per_layer: list[list[int]] = [[] for _ in range(n)]
                per_layer[layer] = members
                out[f"L{layer}/net{c}"] = per_layer
    return out


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, torch.Tensor):
        return _fmt(x.item())
    return str(x)


def retention_rows(results: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(metric, dense, slim, slim/dense) rows from a run's ``results`` dict."""
    if not results:
        return []
    dense, pruned = results.get("dense", {}), results.get("pruned", {})
    rows: list[tuple[str, str, str, str]] = []
    if "params" in dense and "params" in pruned:
        rows.append(("parameters", f"{dense['params']:,}", f"{pruned['params']:,}",
                     f"{pruned['params'] / dense['params']:.3f}"))
    for k, v in dense.items():
        if isinstance(v, dict) and "ppl" in v and isinstance(pruned.get(k), dict):
            d, p = float(v["ppl"]), float(pruned[k]["ppl"])
            rows.append((f"perplexity `{k.removeprefix('ppl_')}`", f"{d:.3f}", f"{p:.3f}", f"{p / d:.3f}"))
    ret = pruned.get("retention")
    if isinstance(ret, dict):
        if "kl" in ret:
            rows.append(("KL(dense‖slim), nats/token", "0", _fmt(float(ret["kl"])), "–"))
        if "top1_agreement" in ret:
            rows.append(("top-1 next-token agreement with dense", "1", f"{float(ret['top1_agreement']):.2%}", "–"))
    tasks = results.get("tasks")
    if isinstance(tasks, dict):
        dense_t = tasks.get("dense") if isinstance(tasks.get("dense"), dict) else None
        slim_t = tasks.get("pruned") if isinstance(tasks.get("pruned"), dict) else tasks
        for task, metrics in sorted(slim_t.items()):
            if not isinstance(metrics, dict) or task in ("dense", "pruned"):
                continue
            for m, val in metrics.items():
                if not isinstance(val, (int, float)) or isinstance(val, bool):
                    continue
                dv = (dense_t or {}).get(task, {}).get(m)
                ratio = f"{val / dv:.3f}" if isinstance(dv, (int, float)) and dv else "–"
                rows.append((f"{task} {m}", _fmt(dv) if dv is not None else "–", _fmt(val), ratio))
    return rows


def model_card(
    *,
    manifest: dict[str, Any],
    summary: dict[str, Any],
    provenance: dict[str, Any],
    results: dict[str, Any] | None,
    base_model: str | None,
    license: str | None,
    has_recipe: bool,
) -> str:
    """The ``README.md`` of an export: YAML front matter, loaders, retention table, widths, provenance."""
    mt = manifest["model_type"]
    front = ["---"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    if license:
        front.append(f"license: {json.dumps(license)}")
    front.append("library_name: transformers")
    front.append("pipeline_tag: text-generation")
    front.append("tags:")
    for t in ("fbnprune", "pruned", "structured-pruning", "mlp-pruning", mt,
              "per-layer-widths" if manifest["loader"] == "fbnprune" else "uniform-widths"):
        front.append(f"- {t}")
    front.append("---")

    lines = front + ["", f"# {base_model or mt} — MLP-pruned with fbnprune", ""]
    dense_total, kept_total = summary.get("total_dense"), summary.get("total_kept")
    if dense_total:
        lines.append(f"{1 - kept_total / dense_total:.1%} of the MLP neurons were removed "
                     f"({kept_total:,} of {dense_total:,} kept)"
                     + (f" with the `{summary['method']}` scorer" if summary.get("method") else "")
                     + (f", `{summary['allocation']}` allocation" if summary.get("allocation") else "") + ".")
    lines.append(f"Parameters: {manifest['params']:,}"
                 + (f" (dense {manifest['dense_params']:,})" if manifest.get("dense_params") else "")
                 + ", tied embeddings counted once. The tensors are physically smaller: this is not a masked model.")
    lines += ["", "## How to load", "", f"Layout: **{'stock (uniform widths)' if manifest['loader'] == 'stock' else 'per-layer widths'}** — {manifest['reason']}.", "",
              "| loader | works? |", "|---|---|"]
    for name, ok in manifest.get("loaders", {}).items():
        lines.append(f"| `{name}` | {ok} |")
    lines.append("")
    if manifest["loader"] == "stock":
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")',
                  'tokenizer = AutoTokenizer.from_pretrained("path/to/this/dir")', "```"]
    else:
        lines += ["```python", "import fbnprune  # pip install fbnprune",
                  'model = fbnprune.load_pretrained("path/to/this/dir")', "```", "",
                  "`config.json` carries transformers' sparse `per_layer_config` overrides "
                  f"(`{manifest['width_key']}` per pruned layer; the global value is the dense width). "
                  "Stock transformers refuses to build the model from it rather than building wrong shapes."]
    if manifest.get("bias_layers"):
        lines += ["", f"Bias compensation: {len(manifest['bias_layers'])} layers have an MLP output bias"
                  + (" (config `mlp_bias: true`)." if manifest["loader"] == "stock" else ".")]

    rows = retention_rows(results)
    lines += ["", "## Retention", ""]
    if rows:
        lines += ["| metric | dense | slim | slim / dense |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    else:
        lines.append("No evaluation results were passed to the export.")
    recovery = (results or {}).get("recovery")
    if recovery and recovery.get("training"):
        from fbnprune.recover.report import to_markdown as recovery_markdown

        lines += ["", "## Recovery", "", "After pruning, the dense model was distilled into this one; the retention "
                  "table above measures the recovered model, \"before\" below the pruned one before recovery.", "",
                  recovery_markdown(recovery.get("rows") or [], recovery["training"])]

    lines += ["", "## Kept MLP neurons per layer", ""]
    has_dense = any("dense_width" in r for r in summary["layers"])
    lines += ["| layer | kept" + (" | dense | kept fraction" if has_dense else "") + " |",
              "|---|---" + ("|---|---" if has_dense else "") + "|"]
    for r in summary["layers"]:
        lines.append(f"| {r['layer']} | {r['kept']}"
                     + (f" | {r.get('dense_width', '–')} | {r.get('kept_fraction', '–')}" if has_dense else "") + " |")
    if summary.get("networks"):
        lines += ["", "Functional networks (members kept / members; a neuron can belong to several networks):", "",
                  "| network | kept | members | kept fraction |", "|---|---|---|---|"]
        nets = sorted(summary["networks"].items(), key=lambda kv: (kv[0] != "union", -kv[1]["members"]))
        for n, t in nets[:12]:
            lines.append(f"| {n} | {t['kept']} | {t['members']} | {t['kept_fraction']} |")
        if len(nets) > 12:
            lines.append(f"| … {len(nets) - 12} more | | | |")
    lines.append("")
    lines.append("Per-layer and per-network counts: `fbnprune_networks.json`.")

    v = provenance.get("versions", {})
    lines += ["", "## Provenance", ""]
    for k in ("fbnprune", "git_sha", "torch", "transformers", "lm_eval", "python"):
        if v.get(k):
            lines.append(f"- {k}: `{v[k]}`")
    for k in ("seed", "date"):
        if provenance.get(k) is not None:
            lines.append(f"- {k}: `{provenance[k]}`")
    model = provenance.get("model") or {}
    if model.get("sha256"):
        lines.append(f"- source weights sha256: `{model['sha256']}`" + (f" ({model.get('gguf')})" if model.get("gguf") else ""))
    for k, h in (provenance.get("data_hashes") or {}).items():
        lines.append(f"- data `{k}` sha256: `{h}`")
    lines += ["", "Files: `fbnprune_export.json` (layout and loaders), `fbnprune_networks.json`, "
              "`fbnprune_provenance.json`" + (", `fbnprune_recipe.yaml` (the resolved recipe)" if has_recipe else "")
              + ".", ""]
    return "\n".join(lines)
