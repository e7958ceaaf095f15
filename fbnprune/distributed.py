"""Data parallelism on ``torch.distributed``: one code path for ``torchrun`` / ``accelerate launch``, gloo on CPU,
NCCL on CUDA.

A launcher starts one process per device and tells each its place through environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`session` reads them, joins the process
group and leaves it; everything else here is a no-op in a plain single process (no process group, no launcher),
so the pipeline calls these helpers unconditionally and a one-process run computes exactly what it computes
without them.

How the pipeline splits work (see ``docs/scale.md``): calibration batches, perplexity and retention batches and
Taylor-gradient batches go round-robin to the ranks (:func:`shard`); discovery windows and layer-sensitivity
layers likewise; per-layer scoring and re-fits (their Grams included) go by layer (:func:`layer_results`). Sums come back with :func:`all_reduce_` or, where the single-process sum is a sequence of Python
floats, as per-batch values gathered and added in batch order (:func:`ordered_sum`), which reproduces it bit for
bit. Rank 0 alone writes shared files (caches, outputs); the others read them after a barrier, so the cache
directory must be visible to every process (:func:`check_shared_dir` refuses a run where it is not).

Failure: a rank that raises records ``rank r failed: <error>`` in the process group's key-value store and leaves
the group, which makes the other ranks' next collective fail at once (a peer's socket closes) instead of
waiting; they raise :class:`PeerFailure` quoting that message. A rank that hangs is caught by the collective
timeout (``FBNPRUNE_DIST_TIMEOUT`` seconds, default 1800).

Example:
    >>> from fbnprune import distributed as dist
    >>> with dist.session("cpu"):  # doctest: +SKIP
    ...     mine = dist.shard(n_batches)          # this rank's batch indices
    ...     total = dist.all_reduce_(partial)     # the sum over every rank's batches
"""

from __future__ import annotations

import importlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from fbnprune.errors import PeerFailure, UserError

T = TypeVar("T")
__all__ = ["PeerFailure"]  # re-exported: callers catch it from here or from fbnprune.errors

FAILED_KEY = "fbnprune/failed"
DEFAULT_TIMEOUT_S = 1800.0
FAILURE_ACK_S = 30.0


# ------------------------------------------------------------------------------------------------ where am I
def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def active() -> bool:
    """Whether a process group of more than one process is up (the helpers below communicate only then)."""
    import torch.distributed as td

    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    import torch.distributed as td

    return td.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as td

    return td.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0) if active() else 0


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes outputs and shared caches."""
    return rank() == 0


def timeout_s() -> float:
    return float(os.environ.get("FBNPRUNE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def device_for(device: str) -> str:
    """The device this rank computes on: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` in a multi-process run."""
    if active() and str(device) == "cuda":
        return f"cuda:{local_rank()}"
    return str(device)


def _backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _comm_device() -> torch.device:
    import torch.distributed as td

    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ session
def init(device: str = "cpu") -> bool:
    """Join the process group the launcher set up (gloo for CPU, NCCL for ``cuda``); False when not launched."""
    import torch.distributed as td

    if not launched() or td.is_initialized():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: start "
                        "several processes with torchrun or accelerate launch, which set them all")
    backend = _backend(device)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError("model.device is cuda but this process sees no CUDA device")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # FSDP's modules take the world group as a default argument when imported after it exists, and a group that
    # is referenced stays connected after an abort: imported first, a failing rank's peers see it leave at once
    importlib.import_module("torch.distributed.fsdp")

    td.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s()))
    if td.get_rank() != 0:
        _quiet_progress_bars()
    return True


def _quiet_progress_bars() -> None:
    """No progress bars on ranks other than 0: every rank runs the same loops, and the launcher interleaves
    their output. The stages pass ``disable=`` explicitly, which tqdm's own environment switch does not override."""
    from tqdm import std

    init = std.tqdm.__init__
    if getattr(init, "_fbnprune_quiet", False):
        return

    def quiet(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet._fbnprune_quiet = True  # type: ignore[attr-defined]
    std.tqdm.__init__ = quiet  # type: ignore[method-assign]


def _store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # no group, or a torch without it: failures are then reported without the peer's message
        return None


def _peer_message() -> str | None:
    """The failing rank's message, if one was recorded; reading it is acknowledged (see :func:`_record_failure`)."""
    store = _store()
    if store is None:
        return None
    try:
        if store.check([FAILED_KEY]):
            msg = store.get(FAILED_KEY).decode()
            store.set(f"{FAILED_KEY}/seen/{rank()}", "1")
            return msg
    except Exception:  # the store lives in rank 0 (or the launcher's agent); gone with it
        return None
    return None


def _store_unreachable() -> bool:
    """Whether the key-value store no longer answers (it lives in rank 0 unless a launcher's agent holds it)."""
    store = _store()
    if store is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return False
    try:
        store.check(["fbnprune/alive"])
    except Exception:
        return True
    return False


def _record_failure(exc: BaseException) -> None:
    """Tell the other ranks why this one stops and leave the group, so that their collectives fail at once.

    The first failure's message is kept. When the key-value store lives in this process (rank 0, unless a
    launcher's agent holds the store), leaving at once would take the message with it: that rank waits (at most
    ``FAILURE_ACK_S``) until every other rank has read it or failed itself.
    """
    import torch.distributed as td

    me, n = rank(), world()
    store = _store()
    first = False
    if store is not None:
        try:
            if not isinstance(exc, PeerFailure):  # a peer's failure is already recorded, by that peer
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                msg = f"rank {me} ({socket.gethostname()}) failed: {type(exc).__name__}" + (f": {text}" if text else "")
                first = store.compare_set(FAILED_KEY, "", msg).decode() == msg
            if not first:
                store.set(f"{FAILED_KEY}/seen/{me}", "1")
        except Exception:  # best effort: the message is also on this rank's stderr
            first = False
    if td.is_initialized():
        try:
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        except Exception:
            try:
                td.destroy_process_group()
            except Exception:
                pass
    holds_store = me == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if first and holds_store and store is not None:
        try:
            store.wait([f"{FAILED_KEY}/seen/{r}" for r in range(n) if r != me], timedelta(seconds=FAILURE_ACK_S))
        except Exception:  # a rank busy outside collectives: it learns of the failure at its next one
            pass


@contextmanager
def session(device: str = "cpu") -> Iterator[bool]:
    """Join the launched process group for the body (yields whether it did); on an exception tell the other
    ranks and leave the group, so none of them waits for this one (see module doc)."""
    import torch.distributed as td

    started = init(device)
    try:
        yield started
    except BaseException as e:
        if started:
            _record_failure(e)
        raise
    if started and td.is_initialized():
        td.destroy_process_group()


def _guard(what: str, fn: Callable[[], T]) -> T:
    """Run one collective; a peer's failure or a timeout becomes a :class:`PeerFailure` naming the cause."""
    try:
        return fn()
    except Exception as e:
        peer = _peer_message()
        if peer is None and _store_unreachable():
            peer = ("rank 0, which holds the run's key-value store, is gone (it failed or was killed; its output "
                    "says why)")
        reason = peer or (f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                          f"(another process of the run stopped or stopped answering within "
                          f"{timeout_s():g} s; see its output)")
        raise PeerFailure(f"rank {rank()} stopped in {what}: {reason}") from e


# ------------------------------------------------------------------------------------------------ collectives
def barrier(what: str = "barrier") -> None:
    import torch.distributed as td

    if active():
        # a barrier as an all-reduce: gloo's and NCCL's barrier differ in how they pick a device
        _guard(what, lambda: td.all_reduce(torch.zeros(1, device=_comm_device())))


def all_reduce_(t: torch.Tensor, op: str = "sum", what: str = "all_reduce") -> torch.Tensor:
    """Reduce ``t`` over ranks in place (``op``: sum, max, min) and return it; unchanged in one process."""
    import torch.distributed as td

    if not active():
        return t
    ops = {"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX, "min": td.ReduceOp.MIN}
    buf = t.to(_comm_device()).contiguous()
    _guard(what, lambda: td.all_reduce(buf, op=ops[op]))
    if buf.data_ptr() != t.data_ptr():
        t.copy_(buf.to(t.device))
    return t


def all_gather_object(obj: Any, what: str = "all_gather") -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    import torch.distributed as td

    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    _guard(what, lambda: td.all_gather_object(out, obj))
    return out


def broadcast_object(obj: Any, src: int = 0, what: str = "broadcast") -> Any:
    """Rank ``src``'s ``obj`` on every rank (other ranks pass anything, e.g. None)."""
    import torch.distributed as td

    if not active():
        return obj
    box = [obj if rank() == src else None]
    _guard(what, lambda: td.broadcast_object_list(box, src=src))
    return box[0]


def broadcast_(t: torch.Tensor, src: int = 0, what: str = "broadcast") -> torch.Tensor:
    """Rank ``src``'s values of ``t`` (same shape and dtype on every rank), in place."""
    import torch.distributed as td

    if not active():
        return t
    buf = t.to(_comm_device()).contiguous()
    _guard(what, lambda: td.broadcast(buf, src=src))
    if buf.data_ptr() != t.data_ptr():
        t.copy_(buf.to(t.device))
    return t


def gather_rows(rows: torch.Tensor, counts: Sequence[int], what: str = "gather") -> list[torch.Tensor] | None:
    """Each rank's ``(n_r, width)`` rows on rank 0 (None elsewhere); ``counts[r]`` is rank r's ``n_r``, known to all
    ranks in advance, so only the rows travel (padded to the largest count)."""
    import torch.distributed as td

    if not active():
        return [rows]
    n_max = max(counts)
    dev = _comm_device()
    buf = torch.zeros((n_max, *rows.shape[1:]), dtype=rows.dtype, device=dev)
    buf[: rows.shape[0]] = rows.to(dev)
    bufs = [torch.empty_like(buf) for _ in range(world())] if is_main() else None
    _guard(what, lambda: td.gather(buf, bufs, dst=0))
    if bufs is None:
        return None
    return [b[:n].cpu() for b, n in zip(bufs, counts, strict=True)]


# ------------------------------------------------------------------------------------------------ work splitting
def shard(n: int) -> list[int]:
    """This rank's share of ``n`` items: ``rank, rank + world, ...`` (all of them in one process)."""
    return list(range(rank(), n, world()))


def owner(i: int) -> int:
    """The rank that :func:`shard` gives item ``i``."""
    return i % world()


def sharding_layers(n: int) -> bool:
    """Whether :func:`layer_results` shares ``n`` layers out (several processes and at least one layer each); when
    it does not, every rank computes every layer and per-layer collectives (a Gram's chunks) stay aligned."""
    return active() and n >= world()


def layer_results(n: int, fn: Callable[[int], T], what: str) -> Iterator[tuple[int, T]]:
    """``(i, fn(i))`` for layers ``0..n-1`` in order, on every rank.

    Layers are independent, so with :func:`sharding_layers` rank r computes layers r, r + world, ... and the
    results of each round of ``world`` layers are exchanged (so no rank holds more than a round's results); ``fn``
    must then use no collective. Otherwise every rank calls ``fn`` for every layer."""
    if not sharding_layers(n):
        for i in range(n):
            yield i, fn(i)
        return
    w, me = world(), rank()
    for start in range(0, n, w):
        i = start + me
        got = all_gather_object(fn(i) if i < n else None, what=f"{what}, layers {start}-{min(start + w, n) - 1}")
        for r, res in enumerate(got):
            if start + r < n:
                yield start + r, res


def ordered_sum(mine: dict[int, Sequence[float]], n: int, what: str = "sum") -> list[float]:
    """Component-wise sums over items ``0..n-1`` of per-item values computed on different ranks, added in item
    order, so the result is the single-process loop's sum to the last bit. ``mine``: item -> values, this rank's."""
    parts: dict[int, Sequence[float]] = {}
    for d in all_gather_object(mine, what):
        parts.update(d)
    if sorted(parts) != list(range(n)):
        raise RuntimeError(f"{what}: items {sorted(set(range(n)) - set(parts))} were computed by no rank")
    width = len(parts[0]) if n else 0
    total = [0.0] * width
    for i in range(n):
        for k in range(width):
            total[k] += parts[i][k]
    return total


@contextmanager
def main_first(what: str = "main first") -> Iterator[None]:
    """Run the body on rank 0 first, then on the others (e.g. rank 0 fills a cache the others then read)."""
    if not is_main():
        barrier(what)
    try:
        yield
    finally:
        if is_main():
            barrier(what)


def check_shared_dir(path: Path) -> None:
    """Refuse a run whose ranks do not see the same ``path`` (rank 0 writes shared caches there, all read them)."""
    if not active():
        return
    probe = path / f".fbnprune-shared-{uuid.uuid4().hex}" if is_main() else None
    if probe is not None:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
    name = broadcast_object(probe.name if probe is not None else None, what="shared directory check")
    seen = all_gather_object((path / name).exists(), what="shared directory check")
    if is_main():
        probe.unlink()  # type: ignore[union-attr]
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise UserError(f"the cache directory {path} is not shared by every process of this run (ranks {blind} "
                        "cannot see rank 0's files there): set FBNPRUNE_CACHE to a directory on a filesystem all "
                        "nodes mount")


def progress_enabled(progress: bool = True) -> bool:
    """Progress bars on rank 0 only."""
    return progress and is_main()


def _backend_name() -> str:
    import torch.distributed as td

    return str(td.get_backend()) if active() else "none"


def info() -> dict[str, Any]:
    """The run's process layout, for reports: processes, backend and the launcher's variables."""
    return {"processes": world(), "backend": _backend_name() if active() else None,
            "launcher": ("accelerate" if any(k.startswith("ACCELERATE_") for k in os.environ) else "torchrun")
            if active() else None}


def on_main(fn: Callable[[], T], what: str) -> T:
    """``fn()`` computed on rank 0 and sent to every rank (data every rank must hold identically, such as sampled
    calibration text); a :class:`~fbnprune.errors.UserError` there is raised on every rank with its message."""
    if not active():
        return fn()
    if is_main():
        try:
            value = fn()
        except UserError as e:
            broadcast_object(("error", str(e)), what=what)
            raise
        broadcast_object(("ok", value), what=what)
        return value
    kind, value = broadcast_object(None, what=what)
    if kind == "error":
        raise UserError(value)
    return value
