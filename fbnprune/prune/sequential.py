"""Sequential (layer-by-layer) pruning: each layer is calibrated on what the already-pruned layers feed it.

The parallel prune stage scores and re-fits every layer on activations of the *dense* model, so layer ``l`` is
pruned for inputs it will never see once layers ``0..l-1`` are pruned, and errors compound with depth. Here the
calibration tokens are embedded once and pushed through the decoder one layer at a time:

1. run layer ``l`` (still dense) on the current hidden states ``X`` (outputs of the pruned layers before it) and
   on the dense model's own hidden states ``D`` (carried alongside), capturing its MLP activations on both;
2. score, select (top-k at the width the uniform plan gives the layer), compensate and slice it with the same
   scorers, compensations and surgery as the parallel stage (they are shown a one-layer view of the model);
3. run the pruned layer on ``X`` to get the next layer's inputs, and record how far its MLP output and the
   residual stream are from the dense model's.

The ``refit`` compensation can aim at two targets (``refit_target``): ``layer`` reproduces the dense weights'
output on the pruned model's inputs (``H_c W^T``, what the parallel stage does on dense inputs); ``dense``
reproduces the dense model's own MLP output at that layer (``H_d W^T``), so the re-fit also corrects the error
the earlier layers made (SparseGPT/SlimGPT-style error correction).

Only the layer being processed has to be in memory: :class:`InMemoryLayers` serves the layers of a loaded model,
:class:`CheckpointLayers` reads each layer from a safetensors checkpoint into a model built on the ``meta`` device
(accelerate's big-model tools) and writes it out pruned as soon as it is done, so peak memory is one decoder layer
plus the calibration hidden states. The loop is the same for both and takes the compute device as a parameter.
After each layer the pruned layer and the hidden states are saved in a work directory, so an interrupted run
resumes at the next layer and gives the same result.

Several processes (:mod:`fbnprune.distributed`) share the calibration tokens of each layer: batch ``b`` is
embedded and carried through the layers on rank ``b % world`` only. Each layer's activations travel to rank 0,
which writes the layer's store exactly as one process does (rows, statistics); the Grams the scorers and re-fits
read are summed over ranks chunk by chunk, the dense-target cross-Gram and the error sums over each rank's own
rows. Every rank then prunes and re-fits the layer identically; rank 0 alone writes. Such a run does not resume
(each rank's hidden states would have to be saved): it starts again from the first layer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.arch import MLPAdapter, get_adapter
from fbnprune.collect.capture import kept_rows, pad_batch
from fbnprune.collect.store import ActivationStore, StoreWriter
from fbnprune.errors import UserError
from fbnprune.prune import needs
from fbnprune.prune.compensate import UNEXPORTABLE_ATTR, compensate_, refit_compensation_
from fbnprune.prune.fbn import DEFAULT_RULE
from fbnprune.prune.gram import clear_gram_cache
from fbnprune.prune.networks import scoring_networks
from fbnprune.prune.ops import apply_plan_
from fbnprune.prune.plan import KeepPlan, make_plan, top_k
from fbnprune.prune.scorers import SCORERS, ScoreContext, score_neurons

REFIT_TARGETS = ("layer", "dense")
#: scorers that need more than one layer's activations (gradients of the model's loss), so cannot run per layer
NOT_SEQUENTIAL = ("taylor",)


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SequentialOptions:
    """How to prune: the prune stage's own settings (``fbnprune.recipe.schema.PruneConfig``) plus the loop's."""

    method: str
    sparsity: float
    compensate: str = "none"
    refit_target: str = "layer"
    ridge: float = 1e-3
    gram_shrink: float = 0.0
    fbn_rule: str | None = None
    discover: Any = None  # DiscoverConfig or mapping, for the methods that discover networks per layer
    protected: tuple[int, ...] = ()
    min_width: int = 8
    round_to: int = 8
    mode: str = "slice"
    seed: int = 0
    batch_size: int = 4
    drop_first: int = 0
    progress: bool = True
    #: kept width of every layer when the caller planned them (the pipeline: protected layers and param budgets);
    #: None: the uniform plan of ``sparsity``
    kept_widths: tuple[int, ...] | None = None

    def check(self) -> None:
        name = SCORERS.canonical(self.method)
        if name in NOT_SEQUENTIAL:
            raise UserError(f"prune.method {self.method!r} needs gradients through the whole model; sequential "
                            "mode prunes one layer at a time and cannot run it (use sequential: false)")
        if self.refit_target not in REFIT_TARGETS:
            raise UserError(f"refit_target must be one of {', '.join(REFIT_TARGETS)}, got {self.refit_target!r}")

    def key(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "progress"}
        d["discover"] = (self.discover.model_dump() if hasattr(self.discover, "model_dump")
                         else dict(self.discover or {}))
        d["protected"] = list(self.protected)
        d["kept_widths"] = list(self.kept_widths or [])
        return d


@dataclass
class SequentialResult:
    """The whole model's keep plan and the per-layer record (errors against the dense model, calibration)."""

    plan: KeepPlan
    layers: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"mode": "sequential", "layers": self.layers,
                "mlp_error": [r["mlp_error"] for r in self.layers],
                "hidden_error": [r["hidden_error"] for r in self.layers]}


# ----------------------------------------------------------------------------------------------- layer sources
class InMemoryLayers:
    """The decoder layers of a model that is already in memory (nothing to load or write)."""

    def __init__(self, model: nn.Module, adapter: MLPAdapter) -> None:
        self.model, self.adapter = model, adapter

    def load(self, i: int) -> nn.Module:
        return self.adapter.layers(self.model)[i]

    def restore(self, i: int, keep: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        """Put a finished layer (from the work directory) back into the model: slice it, then set its tensors."""
        layer = self.load(i)
        mlp = getattr(layer, self.adapter.mlp_attr)
        if len(keep) < self.adapter.width(mlp):
            self.adapter.slice_(mlp, keep)
        _set_tensors(layer, tensors)

    def finish(self, i: int, layer: nn.Module) -> None:
        pass


class CheckpointLayers:
    """Decoder layers read one at a time from a safetensors checkpoint directory (``config.json`` + shards).

    The model is built on the ``meta`` device; the embeddings, final norm and other non-layer weights are loaded
    (they are needed to embed the calibration tokens), each layer is loaded by :meth:`load` and written pruned to
    ``out_dir`` and released by :meth:`finish`. :meth:`write_checkpoint` completes ``out_dir`` as a Hugging Face
    model directory.
    """

    def __init__(self, model_dir: str | Path, out_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.src, self.out = Path(model_dir), Path(out_dir)
        self.device, self.dtype = torch.device(device), dtype
        map_large_allocations()
        if not (self.src / "config.json").is_file():
            raise UserError(f"{self.src} is not a model directory (no config.json)")
        self.config = AutoConfig.from_pretrained(str(self.src))
        self.adapter = get_adapter(self.config)
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.model.eval()
        self.files = _weight_files(self.src)
        self.prefix = self.adapter.layers_path + "."
        if dist.is_main():  # rank 0 alone writes the pruned checkpoint
            self.out.mkdir(parents=True, exist_ok=True)
        rest = self._read(lambda n: not n.startswith(self.prefix))
        _set_tensors(self.model, rest, device=self.device)
        self.model.tie_weights()
        self.rest_names = sorted(rest)
        self.layer_files: dict[int, str] = {}

    def _read(self, want: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out = {}
        for f in self.files:
            with safe_open(str(f), framework="pt") as fh:
                for n in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if want(n):
                        out[n] = fh.get_tensor(n).to(self.dtype)
        return out

    def load(self, i: int) -> nn.Module:
        p = f"{self.prefix}{i}."
        tensors = {n[len(p):]: t for n, t in self._read(lambda n: n.startswith(p)).items()}
        layer = self.adapter.layers(self.model)[i]
        _set_tensors(layer, tensors, device=self.device)
        return layer

    def restore(self, i: int, keep: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        self.layer_files[i] = _layer_file(i)  # written before the interruption

    def finish(self, i: int, layer: nn.Module) -> None:
        name = _layer_file(i)
        if dist.is_main():  # the other ranks hold the same pruned layer and only release it
            sd = {f"{self.prefix}{i}.{k}": v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
            save_file(sd, str(self.out / f".{name}.partial"))
            (self.out / f".{name}.partial").rename(self.out / name)
        self.layer_files[i] = name
        layer.to("meta")  # frees the layer's memory; the module keeps its (pruned) shapes
        release_freed_memory()

    def write_checkpoint(self, plan: KeepPlan, extra_config: dict[str, Any] | None = None) -> Path:
        """Non-layer weights, an index of every tensor and the pruned config: a directory ``from_pretrained``
        loads (uniform widths; per-layer widths are recorded as ``fbnprune_layer_widths``)."""
        rest = self._read(lambda n: not n.startswith(self.prefix))
        save_file({n: t.contiguous() for n, t in rest.items()}, str(self.out / "model-rest.safetensors"))
        weight_map = dict.fromkeys(rest, "model-rest.safetensors")
        for _, f in sorted(self.layer_files.items()):
            from safetensors import safe_open

            with safe_open(str(self.out / f), framework="pt") as fh:
                weight_map.update(dict.fromkeys(fh.keys(), f))
        (self.out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                          indent=1))
        cfg = self.config
        if plan.uniform:
            self.adapter.set_config_width(cfg, plan.kept_widths[0])
        else:
            cfg.fbnprune_layer_widths = plan.kept_widths
        for k, v in (extra_config or {}).items():
            setattr(cfg, k, v)
        cfg.save_pretrained(str(self.out))
        for f in self.src.iterdir():  # tokenizer and generation files travel with the weights
            if f.is_file() and f.suffix in (".json", ".jinja", ".model", ".txt") and not f.name.startswith(
                    ("config", "model")) and f.name != "fbnprune_source.json":
                shutil.copy2(f, self.out / f.name)
        return self.out


def _libc() -> Any:
    """glibc, or None where there is none (other platforms and C libraries: the memory helpers do nothing)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


#: glibc's ``mallopt`` parameter for the size from which an allocation gets pages of its own (``M_MMAP_THRESHOLD``)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> None:
    """Give every allocation of ``threshold`` bytes or more pages of its own, returned on free (glibc ``mallopt``).

    glibc raises that threshold by itself after large blocks are freed (up to 32 MB), so a layer's tensors, freed
    and allocated again layer after layer, end up in a heap that fragments: layer-by-layer pruning of a 64-layer
    synthetic Llama (2,048 neurons per layer) saw its peak memory creep from 900 to 1,150 MB over 33 layers with a
    flat resident set between layers, and stay at 755 MB with the threshold fixed at 1 MB (measured with one
    thread on the development machine; ``benchmarks/sequential/heap_trace.json``). The setting holds for the rest
    of the process; the price is page faults on the fresh pages of every large tensor (not timed separately: the
    64-layer run took 542 s with it)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))


def release_freed_memory() -> None:
    """Give freed heap memory back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    A layer's tensors (a few MB each) come from the C heap, and glibc keeps freed heap pages mapped, so without a
    trim every finished layer would leave its pages resident and the resident set would grow with depth. Called
    after each layer; ``benchmarks/sequential/heap_trace.json`` shows the resident set staying flat from layer to
    layer with it (what remained, the creeping peak, was fragmentation: see :func:`map_large_allocations`)."""
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _layer_file(i: int) -> str:
    return f"model-layer-{i:05d}.safetensors"


def _weight_files(d: Path) -> list[Path]:
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        return sorted({d / f for f in json.loads(idx.read_text())["weight_map"].values()})
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d}: no safetensors weights (sequential loading reads safetensors checkpoints)")
    return files


def _set_tensors(root: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device | str | None = None) -> None:
    """Set parameters/buffers of ``root`` by dotted name, creating a missing parameter (a compensation bias) and
    replacing meta tensors; shapes may differ from the module's (a pruned layer)."""
    for name, t in tensors.items():
        mod_name, _, attr = name.rpartition(".")
        mod = root.get_submodule(mod_name) if mod_name else root
        t = t.to(device) if device is not None else t
        if attr in mod._buffers:
            mod._buffers[attr] = t
        else:
            mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
        if isinstance(mod, nn.Linear) and attr == "weight":
            mod.out_features, mod.in_features = t.shape


# ----------------------------------------------------------------------------------------------- the loop's pieces
@dataclass
class Batches:
    """The calibration tokens in batches, and the keyword arguments the model gives each decoder layer."""

    ids: list[torch.Tensor]
    masks: list[torch.Tensor]
    keep: list[torch.Tensor]  # (B, T) rows that count in statistics (real tokens, minus drop_first)
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]  # [batch][layer] -> (extra args, kwargs)
    hidden: list[torch.Tensor]  # inputs of layer 0 (the embeddings)
    first_seq: list[int]  # index of each batch's first sequence


class _Catch(nn.Module):
    """Stands in for a decoder layer while the embeddings are computed: records its call, passes the input on."""

    def __init__(self, sink: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        super().__init__()
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.sink.append((args, kwargs))
        return hidden_states


def _base_model(model: nn.Module, adapter: MLPAdapter) -> tuple[nn.Module, nn.ModuleList]:
    parent_path, _, attr = adapter.layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return parent, getattr(parent, attr)


@torch.no_grad()
def embed_batches(model: nn.Module, adapter: MLPAdapter, sequences: list[torch.Tensor], *, batch_size: int,
                  drop_first: int, device: torch.device, only: list[int] | None = None) -> Batches:
    """Run the model with every decoder layer replaced by :class:`_Catch`: the embeddings and each layer's
    keyword arguments (attention masks, rotary embeddings, per layer type) exactly as the model makes them.
    ``only``: the indices of the batches to embed (this rank's share); None: all of them."""
    base, layers = _base_model(model, adapter)
    out = Batches([], [], [], [], [], [])
    real = list(layers)
    starts = list(range(0, len(sequences), batch_size))
    for b in (starts[i] for i in (range(len(starts)) if only is None else only)):
        ids, mask = pad_batch(sequences[b:b + batch_size], 0)
        sink: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        first: dict[str, torch.Tensor] = {}

        def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], first: dict = first) -> None:
            if "h" not in first:
                first["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        for i in range(len(real)):
            layers[i] = _Catch(sink)
        h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        finally:
            h.remove()
            for i, layer in enumerate(real):
                layers[i] = layer
        if len(sink) != len(real):
            raise RuntimeError(f"expected {len(real)} decoder-layer calls, saw {len(sink)}")
        out.ids.append(ids)
        out.masks.append(mask)
        out.keep.append(kept_rows(mask, drop_first).to(device))
        out.calls.append(sink)
        out.hidden.append(first["h"])
        out.first_seq.append(b)
    return out


@contextmanager
def _hooks(mod: nn.Module, pre: Callable[..., None] | None = None, post: Callable[..., None] | None = None
           ) -> Iterator[None]:
    hs = []
    if pre is not None:
        hs.append(mod.register_forward_pre_hook(pre))
    if post is not None:
        hs.append(mod.register_forward_hook(post))
    try:
        yield
    finally:
        for h in hs:
            h.remove()


@torch.no_grad()
def run_layer(layer: nn.Module, adapter: MLPAdapter, i: int, xs: list[torch.Tensor], batches: Batches,
              capture: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """Layer ``i`` on every batch: its outputs, and (``capture``) its MLP's down-projection inputs and outputs
    on the counted rows, stacked ``(rows, width)`` and ``(rows, d)`` in float32 on CPU."""
    down = adapter.down_module(getattr(layer, adapter.mlp_attr))
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    cur: dict[str, torch.Tensor] = {}

    def pre(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        ins.append(args[0][cur["keep"]].float().cpu())

    def post(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
        outs.append(out[cur["keep"]].float().cpu())

    ys = []
    with _hooks(down, pre if capture else None, post if capture else None):
        for b, x in enumerate(xs):
            cur["keep"] = batches.keep[b]
            args, kwargs = batches.calls[b][i]
            y = layer(x, *args, **kwargs)
            ys.append(y[0] if isinstance(y, tuple) else y)
    if not capture:
        return ys, None, None
    return ys, torch.cat(ins), torch.cat(outs)


def _rel(a: torch.Tensor | list[torch.Tensor], b: torch.Tensor | list[torch.Tensor],
         keep: list[torch.Tensor] | None = None) -> float:
    """``||a - b||^2 / ||b||^2`` (over the counted rows when ``a``/``b`` are per-batch hidden states), both sums
    over every rank's rows."""
    if isinstance(a, list):
        assert isinstance(b, list) and keep is not None
        num = sum(float((x[k] - y[k]).double().pow(2).sum()) for x, y, k in zip(a, b, keep, strict=True))
        den = sum(float(y[k].double().pow(2).sum()) for y, k in zip(b, keep, strict=True))
    else:
        assert isinstance(b, torch.Tensor)
        num, den = float((a - b).double().pow(2).sum()), float(b.double().pow(2).sum())
    if dist.active():
        num, den = dist.all_reduce_(torch.tensor([num, den], dtype=torch.float64), what="layer errors").tolist()
    return num / max(den, 1e-30)


def _one_layer_store(path: Path, h: torch.Tensor, keeps: list[torch.Tensor], first_seq: list[int], key: str,
                     meta: dict[str, Any], doc_ids: list[int] | None = None) -> ActivationStore:
    """``h`` as a one-layer activation store (what scorers, discovery and compensations read); ``keeps`` and
    ``first_seq`` describe every batch (the counted rows, the index of its first sequence)."""
    writer = StoreWriter(path, [h.shape[1]], h.shape[0], True,
                         dict(meta, data_sha256=key, model={"sha256": key, "dtype": "float32"}))
    try:
        o = 0
        for b, keep in enumerate(keeps):
            bi, pos = keep.cpu().nonzero(as_tuple=True)
            seq = bi + first_seq[b]
            writer.rows[o:o + len(bi), 0] = seq.numpy()
            writer.rows[o:o + len(bi), 1] = pos.numpy()
            writer.rows[o:o + len(bi), 2] = torch.as_tensor(doc_ids)[seq].numpy() if doc_ids else seq.numpy()
            o += len(bi)
        writer.add(0, 0, h)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def _cross_gram(hc: torch.Tensor, hd: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``[H_c, 1]^T H_d`` in float64 (the right-hand side of a re-fit towards the dense model's output), summed
    over every rank's rows."""
    w = hc.shape[1]
    c = torch.zeros(w + 1, hd.shape[1], dtype=torch.float64)
    for a in range(0, hc.shape[0], chunk):
        x, y = hc[a:a + chunk], hd[a:a + chunk]
        c[:w] += (x.T @ y).double()
        c[w] += y.double().sum(0)
    return dist.all_reduce_(c, what="cross-Gram")


def _all_batches(sequences: list[torch.Tensor], batch_size: int, drop_first: int) -> tuple[list[torch.Tensor], list[int]]:
    """The counted rows and first sequence of every calibration batch (what rank 0 needs to lay out all ranks'
    rows in a layer store, without embedding the other ranks' batches)."""
    keeps, first = [], []
    for b in range(0, len(sequences), batch_size):
        _, mask = pad_batch(sequences[b:b + batch_size], 0)
        keeps.append(kept_rows(mask, drop_first))
        first.append(b)
    return keeps, first


def _rows_to_main(h: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
    """Every rank's rows ``h`` (its batches', in order) as one matrix in batch order on rank 0; None elsewhere."""
    world, me = dist.world(), dist.rank()
    parts: list[torch.Tensor | None] = [None] * len(counts)
    off = 0
    for step in range(-(-len(counts) // world)):
        batch = [step * world + r for r in range(world)]
        n = [counts[b] if b < len(counts) else 0 for b in batch]
        got = dist.gather_rows(h[off:off + n[me]], n, what="layer activations")
        off += n[me]
        for b, part in zip(batch, got or [], strict=False):
            if b < len(counts):
                parts[b] = part
    return torch.cat(parts) if dist.is_main() else None  # type: ignore[arg-type]


def _layer_store(path: Path, i: int, hc: torch.Tensor, batches: Batches, sequences: list[torch.Tensor],
                 opts: SequentialOptions, doc_ids: list[int] | None) -> ActivationStore:
    """Layer ``i``'s activations on the pruned model's inputs as a one-layer store; in several processes rank 0
    writes it from every rank's rows, the others open it once written."""
    meta = {"source": "sequential", "drop_first": opts.drop_first}
    if not dist.active():
        key = hashlib.sha256(hc.numpy().tobytes()).hexdigest()[:20]
        return _one_layer_store(path, hc, batches.keep, batches.first_seq, f"sequential-{i}-{key}", meta, doc_ids)
    keeps, first = _all_batches(sequences, opts.batch_size, opts.drop_first)
    full = _rows_to_main(hc, [int(k.sum()) for k in keeps])
    if full is not None:
        key = hashlib.sha256(full.numpy().tobytes()).hexdigest()[:20]
        _one_layer_store(path, full, keeps, first, f"sequential-{i}-{key}", meta, doc_ids)
    dist.barrier("layer store")
    return ActivationStore(path)


class _OneLayer:
    """The model as the prune stage's functions see it, holding one decoder layer: scorers, compensations and
    ``apply_plan_`` reach layers through the adapter's ``layers_path``, so layer ``i`` is layer 0 here."""

    def __init__(self, config: Any, adapter: MLPAdapter, layer: nn.Module) -> None:
        self.config = config
        obj: Any = self
        parts = adapter.layers_path.split(".")
        for p in parts[:-1]:
            nxt = SimpleNamespace()
            setattr(obj, p, nxt)
            obj = nxt
        setattr(obj, parts[-1], [layer])


def uniform_widths(widths: list[int], opts: SequentialOptions) -> list[int]:
    """Kept width of every layer: the parallel stage's uniform plan (scores do not move uniform widths)."""
    dummy = [torch.zeros(w, dtype=torch.float64) for w in widths]
    plan = make_plan(dummy, sparsity=opts.sparsity, allocation="uniform", protected=list(opts.protected),
                     min_width=opts.min_width, round_to=opts.round_to)
    return plan.kept_widths


# ----------------------------------------------------------------------------------------------- the loop
def work_key(model_id: str, calib_sha: str, opts: SequentialOptions) -> str:
    blob = json.dumps({"model": model_id, "calib": calib_sha, "opts": opts.key(), "v": 1}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def prune_sequential(
    layers: InMemoryLayers | CheckpointLayers,
    sequences: list[torch.Tensor],
    opts: SequentialOptions,
    work_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    doc_ids: list[int] | None = None,
    after_layer: Callable[[int], None] | None = None,
) -> SequentialResult:
    """Prune every decoder layer in order, each calibrated on the outputs of the pruned layers before it.

    ``work_dir`` holds one checkpoint per finished layer; a call with the same ``work_dir`` after an interruption
    resumes at the first unfinished layer. It is removed when the run completes. ``doc_ids`` (per sequence) go into
    the per-layer stores for discovery in blocks of texts. ``after_layer(i)`` is called
    after layer ``i`` is saved (tests use it to simulate a crash).
    """
    opts.check()
    device = torch.device(device)
    model, adapter = layers.model, layers.adapter
    work = Path(work_dir)
    main, several = dist.is_main(), dist.active()
    if main:
        work.mkdir(parents=True, exist_ok=True)
    n_layers = len(adapter.layers(model))
    widths = [adapter.width(getattr(layer, adapter.mlp_attr)) for layer in adapter.layers(model)]
    kept = list(opts.kept_widths) if opts.kept_widths is not None else uniform_widths(widths, opts)
    if len(kept) != n_layers or any(not 0 < k <= w for k, w in zip(kept, widths, strict=True)):
        raise UserError(f"kept widths {kept} do not fit the model's layer widths {widths}")
    n_batches = -(-len(sequences) // opts.batch_size)
    if several and n_batches < dist.world():
        raise UserError(f"{n_batches} calibration batches for {dist.world()} processes: every process needs at least "
                        "one (more calibration tokens, a smaller collect.batch_size or fewer processes)")
    batches = embed_batches(model, adapter, sequences, batch_size=opts.batch_size, drop_first=opts.drop_first,
                            device=device, only=dist.shard(n_batches) if several else None)
    xs = [h.to(device) for h in batches.hidden]
    ds = [h.clone() for h in xs]
    records: list[dict[str, Any]] = []
    keeps: list[torch.Tensor] = []
    start = 0
    state = work / "stream.pt"
    if state.is_file() and not several:  # resume: finished layers come back from the work directory
        st = torch.load(state, weights_only=True)
        start = int(st["next"])
        xs, ds = [x.to(device) for x in st["x"]], [d.to(device) for d in st["d"]]
        for i in range(start):
            rec = json.loads((work / f"layer_{i:03d}.json").read_text())
            keep = torch.tensor(rec.pop("keep"), dtype=torch.long)
            layers.restore(i, keep, load_file(str(work / f"layer_{i:03d}.safetensors")))
            records.append(rec)
            keeps.append(keep)
            if rec.get("unexportable"):
                setattr(model, UNEXPORTABLE_ATTR, rec["unexportable"])
            for k, v in rec.get("config", {}).items():
                setattr(model.config, k, v)
    bar = tqdm(range(start, n_layers), desc="sequential prune", unit="layer", disable=not opts.progress,
               initial=start, total=n_layers)
    for i in bar:
        layer = layers.load(i)
        layer.eval()
        # the layer, still dense, on the pruned model's inputs and on the dense model's
        _, hc, _ = run_layer(layer, adapter, i, xs, batches)
        ds_next, hd, yd = run_layer(layer, adapter, i, ds, batches)
        assert hc is not None and hd is not None and yd is not None
        store_dir = work / f"store_{i:03d}"
        store = _layer_store(store_dir, i, hc, batches, sequences, opts, doc_ids)
        view = _OneLayer(model.config, adapter, layer)
        w = widths[i]
        plan = KeepPlan(widths=[w], keep=[torch.arange(w)])
        nets = None
        if kept[i] < w and needs(opts.method, opts.compensate, opts.fbn_rule or DEFAULT_RULE).networks:
            nets = scoring_networks(ScoreContext(model=view, adapter=adapter, store=store,
                                                 discover=opts.discover, progress=False), opts.method)
        if kept[i] < w:
            ctx = ScoreContext(model=view, adapter=adapter, store=store, seed=opts.seed + i,
                               sparsity=1 - kept[i] / w, ridge=opts.ridge, gram_shrink=opts.gram_shrink,
                               fbn_rule=opts.fbn_rule,
                               networks=nets, discover=opts.discover, progress=False)
            scores = score_neurons(opts.method, ctx)
            # the same scores on every rank; rank 0's choice is the one every rank prunes by
            keep = dist.broadcast_object(top_k(scores[0], kept[i]), what=f"neurons kept in layer {i}")
            plan = KeepPlan(widths=[w], keep=[keep])
        cfg_before = {k: getattr(model.config, k, None) for k in ("mlp_bias", "fbnprune_compensation")}
        comp: Any = None
        if kept[i] == w:  # a protected layer: unchanged, with the zero bias a compensated checkpoint needs
            if opts.compensate != "none":
                adapter.add_down_bias_(getattr(layer, adapter.mlp_attr),
                                       torch.zeros(adapter.down_weight(getattr(layer, adapter.mlp_attr)).shape[0]))
        elif opts.compensate == "refit" and opts.refit_target == "dense":
            comp = refit_compensation_(view, plan, store, ridge=opts.ridge, progress=False,
                                       cross={0: _cross_gram(hc, hd)}, gram_shrink=opts.gram_shrink)
        else:
            comp = compensate_(view, plan, store, opts.compensate, ridge=opts.ridge, gram_shrink=opts.gram_shrink,
                               progress=False, method=opts.method, fbn_rule=opts.fbn_rule, networks=nets)
        apply_plan_(view, plan, mode=opts.mode)
        xs, _, yc = run_layer(layer, adapter, i, xs, batches)
        assert yc is not None
        rec = {"layer": i, "kept": kept[i], "mlp_error": _rel(yc, yd), "hidden_error": _rel(xs, ds_next, batches.keep)}
        if comp and isinstance(comp, dict) and comp.get("layers"):
            rec["refit"] = comp["layers"].get(0)
        changed = {k: getattr(model.config, k, None) for k in cfg_before
                   if getattr(model.config, k, None) != cfg_before[k]}
        if changed:
            rec["config"] = changed
        if getattr(view, UNEXPORTABLE_ATTR, None):
            rec["unexportable"] = getattr(view, UNEXPORTABLE_ATTR)
            setattr(model, UNEXPORTABLE_ATTR, rec["unexportable"])
        ds = ds_next
        # checkpoint: the pruned layer, its record, then (last, atomically) the streams that resume after it
        if not several:
            save_file({k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()},
                      str(work / f"layer_{i:03d}.safetensors"))
            (work / f"layer_{i:03d}.json").write_text(json.dumps({**rec, "keep": plan.keep[0].tolist()}))
            torch.save({"next": i + 1, "x": [x.cpu() for x in xs], "d": [d.cpu() for d in ds]}, work / "stream.tmp")
            (work / "stream.tmp").replace(state)
        dist.barrier("layer done")  # every rank has read the layer's store before rank 0 removes it
        if main:
            shutil.rmtree(store_dir, ignore_errors=True)
        clear_gram_cache()  # the layer's Grams (two would stay cached, 34 MB each at 2,048 neurons) are not read again
        layers.finish(i, layer)
        records.append(rec)
        keeps.append(plan.keep[0])
        bar.set_postfix(mlp_err=f"{rec['mlp_error']:.3g}", hidden_err=f"{rec['hidden_error']:.3g}")
        if after_layer is not None:
            after_layer(i)
    full = KeepPlan(widths=widths, keep=keeps)
    full.info.update(allocation="uniform", protected=list(opts.protected), sequential=True,
                     refit_target=opts.refit_target if opts.compensate == "refit" else None,
                     removed=full.n_removed, min_width=opts.min_width, round_to=opts.round_to)
    if isinstance(layers, InMemoryLayers) and opts.mode == "slice":
        if full.uniform:
            adapter.set_config_width(model.config, full.kept_widths[0])
        else:
            model.config.fbnprune_layer_widths = full.kept_widths
    if main:
        shutil.rmtree(work, ignore_errors=True)
    return SequentialResult(full, records)


# ----------------------------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def layer_errors(dense: nn.Module, pruned: nn.Module, sequences: list[torch.Tensor], *, batch_size: int = 4,
                 drop_first: int = 0) -> dict[str, list[float]]:
    """Per layer, how far the pruned model's MLP output and residual stream are from the dense model's on
    ``sequences`` (relative squared error): the same numbers the sequential loop records, for any pruned model
    (so parallel and sequential pruning can be compared layer by layer). Batch by batch, so memory stays at
    one batch's hidden states per layer."""
    adapter = get_adapter(dense)
    n = len(adapter.layers(dense))
    sums = {k: torch.zeros(n, 2, dtype=torch.float64) for k in ("mlp_error", "hidden_error")}

    def trace(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        got: dict[str, list[torch.Tensor]] = {"mlp_error": [], "hidden_error": []}
        dev = next(model.parameters()).device
        keep = kept_rows(mask, drop_first).to(dev)
        hs = []
        for layer in adapter.layers(model):
            down = adapter.down_module(getattr(layer, adapter.mlp_attr))
            hs.append(down.register_forward_hook(lambda _m, _a, o: got["mlp_error"].append(o[keep].float().cpu())))
            hs.append(layer.register_forward_hook(lambda _m, _a, o: got["hidden_error"].append(
                (o[0] if isinstance(o, tuple) else o)[keep].float().cpu())))
        try:
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
        finally:
            for h in hs:
                h.remove()
        return got

    for b in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[b:b + batch_size], 0)
        d, p = trace(dense, ids, mask), trace(pruned, ids, mask)
        for k, acc in sums.items():
            for i, (x, y) in enumerate(zip(p[k], d[k], strict=True)):
                acc[i, 0] += float((x - y).double().pow(2).sum())
                acc[i, 1] += float(y.double().pow(2).sum())
    return {k: (acc[:, 0] / acc[:, 1].clamp_min(1e-30)).tolist() for k, acc in sums.items()}
