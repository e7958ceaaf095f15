"""The :class:`MLPAdapter` dataclass and the operations every stage needs on an MLP block.

An MLP block maps ``x -> down(h)`` with ``h = act(gate(x)) * up(x)`` (gated), ``act(fc(x))`` (GPT-2), or the
fused-gate variant (Phi-3). Neuron ``j`` is row ``j`` of each input projection and column ``j`` of the down
projection; ``h`` (the down projection's input) is the per-neuron activation that pruning removes.
All weight accessors return views in ``nn.Linear`` orientation: input weights ``(I, d)``, down weight ``(d, I)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from fbnprune.errors import UserError
from fbnprune.registry import Registry

Style = Literal["gated", "fused_gated", "conv1d"]


@dataclass(frozen=True)
class MLPAdapter:
    """Where a model family keeps its MLP neurons.

    Attributes:
        name: registry key (a ``model_type``).
        layers_path: dotted path from the ``*ForCausalLM`` to the list of decoder layers.
        mlp_attr: attribute of a decoder layer holding the MLP.
        style: ``gated`` (separate gate/up), ``fused_gated`` (one ``gate_up_proj``, gate first) or ``conv1d`` (GPT-2).
        in_projs: names of the input projections (rows = neurons).
        down: name of the output projection (columns = neurons).
        width_key: config attribute holding the MLP width.
        bias_key: config flag that makes stock modeling code create an MLP bias (Llama's ``mlp_bias``); ``None``
            when the architecture has no such switch, or ``"always"`` when the down projection always has one.

    Example:
        >>> MLPAdapter(name="mytype", layers_path="model.layers")  # doctest: +ELLIPSIS
        MLPAdapter(name='mytype', ...)
    """

    name: str
    layers_path: str
    mlp_attr: str = "mlp"
    style: Style = "gated"
    in_projs: tuple[str, ...] = ("gate_proj", "up_proj")
    down: str = "down_proj"
    width_key: str = "intermediate_size"
    bias_key: str | None = None

    # ----------------------------------------------------------------- navigation
    def layers(self, model: nn.Module) -> list[nn.Module]:
        obj: Any = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return list(obj)

    def mlps(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(layer, self.mlp_attr) for layer in self.layers(model)]

    def down_module(self, mlp: nn.Module) -> nn.Module:
        return getattr(mlp, self.down)

    def module_name(self, layer_idx: int, which: str) -> str:
        """Dotted name of a module inside layer ``layer_idx`` (as in ``model.named_modules()``)."""
        return f"{self.layers_path}.{layer_idx}.{self.mlp_attr}.{which}"

    # ----------------------------------------------------------------- weights (nn.Linear orientation)
    def width(self, mlp: nn.Module) -> int:
        return self.down_weight(mlp).shape[1]

    def down_weight(self, mlp: nn.Module) -> torch.Tensor:
        w = self.down_module(mlp).weight
        return w.t() if self.style == "conv1d" else w

    def down_bias(self, mlp: nn.Module) -> torch.Tensor | None:
        return self.down_module(mlp).bias

    def in_weights(self, mlp: nn.Module) -> list[torch.Tensor]:
        """Input-projection weights ``(I, d)``, one per projection (gate first)."""
        if self.style == "conv1d":
            return [getattr(mlp, p).weight.t() for p in self.in_projs]
        if self.style == "fused_gated":
            w = getattr(mlp, self.in_projs[0]).weight
            return list(w.chunk(2, dim=0))
        return [getattr(mlp, p).weight for p in self.in_projs]

    # ----------------------------------------------------------------- surgery
    def _rows(self, keep: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
        if self.style == "fused_gated":
            return torch.cat([keep, keep + self.width(mlp)])
        return keep

    def slice_(self, mlp: nn.Module, keep: torch.Tensor) -> None:
        """Keep only neurons ``keep`` (sorted, unique); tensors shrink, dtype and device are preserved."""
        keep = keep.to(torch.long).sort().values
        for p in self.in_projs:
            mod = getattr(mlp, p)
            rows = self._rows(keep.to(mod.weight.device), mlp)
            if self.style == "conv1d":  # Conv1D weight is (in, out)
                mod.weight = nn.Parameter(mod.weight.data[:, rows].clone(), requires_grad=mod.weight.requires_grad)
                mod.nf = len(rows)
            else:
                mod.weight = nn.Parameter(mod.weight.data[rows].clone(), requires_grad=mod.weight.requires_grad)
                mod.out_features = len(rows)
            if getattr(mod, "bias", None) is not None:
                mod.bias = nn.Parameter(mod.bias.data[rows].clone(), requires_grad=mod.bias.requires_grad)
        down = self.down_module(mlp)
        k = keep.to(down.weight.device)
        if self.style == "conv1d":
            down.weight = nn.Parameter(down.weight.data[k].clone(), requires_grad=down.weight.requires_grad)
            down.nx = len(k)
        else:
            down.weight = nn.Parameter(down.weight.data[:, k].clone(), requires_grad=down.weight.requires_grad)
            down.in_features = len(k)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(k)

    def mask_(self, mlp: nn.Module, keep: torch.Tensor) -> None:
        """Zero every neuron not in ``keep``; shapes stay the same (for experiments, not compression)."""
        width = self.width(mlp)
        drop = torch.ones(width, dtype=torch.bool)
        drop[keep.to(torch.long).cpu()] = False
        with torch.no_grad():
            for p in self.in_projs:
                mod = getattr(mlp, p)
                rows = drop.repeat(2) if self.style == "fused_gated" else drop
                rows = rows.to(mod.weight.device)
                if self.style == "conv1d":
                    mod.weight[:, rows] = 0
                else:
                    mod.weight[rows] = 0
                if getattr(mod, "bias", None) is not None:
                    mod.bias[rows] = 0
            down = self.down_module(mlp)
            d = drop.to(down.weight.device)
            if self.style == "conv1d":
                down.weight[d] = 0
            else:
                down.weight[:, d] = 0

    def add_down_bias_(self, mlp: nn.Module, delta: torch.Tensor) -> None:
        """Add ``delta`` (shape ``(d,)``) to the down projection's bias, creating it if needed.

        For ``bias_key == "mlp_bias"`` (Llama) the stock config switch also gives gate/up a bias, so zero biases
        are added there too: the checkpoint then matches what ``from_pretrained`` builds from the config.
        """
        down = self.down_module(mlp)
        w = down.weight
        with torch.no_grad():
            if down.bias is None:
                down.bias = nn.Parameter(torch.zeros(delta.shape[0], dtype=w.dtype, device=w.device))
            down.bias += delta.to(w.dtype).to(w.device)
            if self.bias_key == "mlp_bias":
                for p in self.in_projs:
                    mod = getattr(mlp, p)
                    if mod.bias is None:
                        mod.bias = nn.Parameter(
                            torch.zeros(mod.weight.shape[0], dtype=w.dtype, device=w.device)
                        )

    def can_export_bias(self) -> bool:
        """Whether a stock config can express a down-projection bias for this architecture."""
        return self.bias_key is not None

    # ----------------------------------------------------------------- config
    def config_width(self, config: Any) -> int:
        v = getattr(config, self.width_key, None)
        if v is None and self.style == "conv1d":  # GPT-2: n_inner=None means 4 * n_embd
            return 4 * config.n_embd
        return int(v)

    def set_config_width(self, config: Any, width: int) -> None:
        setattr(config, self.width_key, int(width))

    def enable_config_bias(self, config: Any) -> None:
        if self.bias_key == "mlp_bias":
            config.mlp_bias = True
        elif self.bias_key != "always":
            raise UserError(
                f"architecture {self.name!r} has no config switch for an MLP bias; "
                "bias compensation cannot be exported to a stock-loadable checkpoint"
            )


ADAPTERS: Registry[MLPAdapter] = Registry("architecture")


def get_adapter(model_or_type: Any) -> MLPAdapter:
    """The adapter for a model, a config, or a ``model_type`` string; a clear error names the supported ones."""
    if isinstance(model_or_type, str):
        mt = model_or_type
    else:
        cfg = getattr(model_or_type, "config", model_or_type)
        mt = getattr(cfg, "model_type", None)
        if mt is None:
            raise UserError(f"cannot tell the architecture of {type(model_or_type).__name__}: no config.model_type")
    if mt not in ADAPTERS:
        raise UserError(
            f"unsupported architecture {mt!r}; supported model types: {', '.join(ADAPTERS.names())}. "
            "See docs/adding-an-architecture.md to add one."
        )
    return ADAPTERS.get(mt)
