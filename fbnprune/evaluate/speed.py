"""Size and speed of a model: parameters (tied weights once), bytes of the parameters, greedy generation tokens/s.

Why a fixed protocol: tokens/s depends on prompt length, number of new tokens, batch size, threads and whether
the first (warm-up) call is counted. Everything is fixed here and recorded next to the number; the median of
``repeats`` timed runs is reported, after one untimed warm-up run.

Why dense and pruned are measured together (:func:`paired_generation_speed`): on a shared machine the load
changes from one minute to the next, and two models timed minutes apart compare the load, not the models (so
timed on a busy 2-core machine, a 20%-pruned SmolLM2 measured 2.8 tokens/s against the dense 5.1). Timed in
alternation, a change of load hits both; the CPU time beside the wall time, and the load average, say whether
the machine was busy enough that even the alternation cannot be trusted, and then the ratio is not presented as
a result.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# The measurement is not trusted when the thread driving the generation ran on a core less than this share of
# the wall time. That thread computes or spin-waits for torch's worker threads the whole time, so on an idle
# machine its CPU time equals the wall time whatever the model's size or the number of threads; what is missing
# went to other work. (The process's CPU time over all threads is no such measure: a small model leaves most
# worker threads idle.)
MIN_CPU_SHARE = 0.5

DEFAULT_PROMPT = "The history of the city begins in the early nineteenth century, when"


def unique_parameters(model: Any) -> list[torch.Tensor]:
    """Parameters with tied/shared tensors counted once (by storage pointer)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


class _Generator:
    """One model's greedy decoding of the fixed prompt: an untimed warm-up, then timed calls."""

    def __init__(self, model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> None:
        self.model = model
        self.enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
                       use_cache=True)
        self.produced = 0

    @property
    def prompt_tokens(self) -> int:
        return int(self.enc["input_ids"].shape[1])

    @torch.no_grad()
    def __call__(self, warm_up: bool = False) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            if warm_up:
                self.model.generate(**self.enc, **{**self.kw, "max_new_tokens": 8, "min_new_tokens": 8})
            else:
                out = self.model.generate(**self.enc, **self.kw)
                self.produced = int(out.shape[1] - self.prompt_tokens)
        finally:
            self.model.train(was_training)


def _protocol(gen: _Generator, repeats: int) -> dict[str, Any]:
    return {"new_tokens": gen.produced, "prompt_tokens": gen.prompt_tokens, "repeats": repeats, "batch": 1,
            "decoding": "greedy, KV cache", "threads": torch.get_num_threads()}


def generation_speed(model: Any, tokenizer: Any, *, prompt: str = DEFAULT_PROMPT, new_tokens: int = 64,
                     repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Greedy decoding speed of one model (batch 1, KV cache on, exactly ``new_tokens`` new tokens).

    To compare two models use :func:`paired_generation_speed`: two calls of this function minutes apart measure
    the machine's load as much as the models.
    """
    gen = _Generator(model, tokenizer, prompt, new_tokens)
    torch.manual_seed(seed)
    gen(warm_up=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gen()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"tokens_per_s": round(gen.produced / med, 2), "seconds_median": round(med, 3), **_protocol(gen, repeats)}


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (a container may have fewer)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_reason(load1: float, cores: int, threads: int, cpu_share: float | None) -> str | None:
    """Why a speed measurement on this machine is not a result, or None when it is.

    The 1-minute load average counts this process's own busy threads, so the load of other work is ``load1 -
    threads``; more of it than ``cores - 1`` leaves the measurement less than one free core. ``cpu_share`` (see
    :data:`MIN_CPU_SHARE`) shows contention during the measurement itself, which the lagging average may miss.
    """
    if load1 - threads > cores - 1:
        return (f"1-minute load average {load1:.2f} on {cores} cores ({threads} of it this process's threads): "
                "other work used the cores")
    if cpu_share is not None and cpu_share < MIN_CPU_SHARE:
        return (f"the generating thread ran on a core {cpu_share:.0%} of the wall time (under "
                f"{MIN_CPU_SHARE:.0%}): other work used the cores")
    return None


def paired_generation_speed(dense: Any, pruned: Any, tokenizer: Any, *, prompt: str = DEFAULT_PROMPT,
                            new_tokens: int = 64, repeats: int = 4, seed: int = 0,
                            wall: Callable[[], float] = time.perf_counter,
                            cpu: Callable[[], float] = time.process_time,
                            thread_cpu: Callable[[], float] = time.thread_time,
                            loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
                            cores: int | None = None) -> dict[str, dict[str, Any]]:
    """Greedy decoding speed of ``dense`` and ``pruned``, timed in alternation on the same prompt.

    Repeat ``i`` times both models back to back, dense first when ``i`` is even and pruned first when it is odd,
    so neither always runs in the other's wake. Each call's wall time (``wall``) and CPU time of this process
    (``cpu``; all its threads) are recorded, and the CPU time of this thread (``thread_cpu``) over the whole
    measurement gives the CPU share of :data:`MIN_CPU_SHARE`. The speed-up is the median over repeats of the
    ratio of the two adjacent wall times, which a slow drift of the load cancels out of; ``cpu_speedup`` is the
    same with CPU times, which time spent off a core does not inflate (threads spin-waiting for a preempted peer
    still do). When :func:`busy_reason` finds the machine busy (load average before or after, or the CPU share
    of this measurement on a CPU device), ``speedup`` is None and ``warning`` says why; the measured ratios stay
    in the record.

    Returns:
        ``{"dense": {...}, "pruned": {...}}``, each model's tokens/s (wall and CPU, medians) with the protocol;
        the pruned entry carries the comparison under ``vs_dense``.
    """
    gens = {"dense": _Generator(dense, tokenizer, prompt, new_tokens),
            "pruned": _Generator(pruned, tokenizer, prompt, new_tokens)}
    torch.manual_seed(seed)
    for g in gens.values():
        g(warm_up=True)
    load_before = loadavg()
    thread0, wall0 = thread_cpu(), wall()
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in gens}
    order = []
    for i in range(repeats):
        for name in ("dense", "pruned") if i % 2 == 0 else ("pruned", "dense"):
            w0, c0 = wall(), cpu()
            gens[name]()
            times[name]["wall"].append(wall() - w0)
            times[name]["cpu"].append(cpu() - c0)
            order.append(name)
    thread_used, wall_used = thread_cpu() - thread0, wall() - wall0
    load_after = loadavg()
    threads = torch.get_num_threads()
    cores = cores or _cores()
    out: dict[str, dict[str, Any]] = {}
    for name, g in gens.items():
        w, c = statistics.median(times[name]["wall"]), statistics.median(times[name]["cpu"])
        out[name] = {"tokens_per_s": round(g.produced / w, 2), "tokens_per_cpu_s": round(g.produced / c, 2),
                     "seconds_median": round(w, 4), "cpu_seconds_median": round(c, 4),
                     "wall_s": [round(x, 4) for x in times[name]["wall"]],
                     "cpu_s": [round(x, 4) for x in times[name]["cpu"]], **_protocol(g, repeats)}

    def ratio(clock: str) -> float:
        d, p = times["dense"][clock], times["pruned"][clock]
        return round(statistics.median(a / b for a, b in zip(d, p, strict=True)), 4)

    on_cpu = next(pruned.parameters()).device.type == "cpu"  # on an accelerator the thread may sleep in a sync
    share = thread_used / wall_used if on_cpu and wall_used > 0 else None
    warning = busy_reason(max(load_before[0], load_after[0]), cores, threads, share)
    out["pruned"]["vs_dense"] = {
        "speedup": None if warning else ratio("wall"), "wall_ratio": ratio("wall"), "cpu_speedup": ratio("cpu"),
        "busy": warning is not None, "warning": warning, "order": order,
        "cpu_share": None if share is None else round(share, 3),
        "load": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after],
                 "cores": cores, "threads": threads},
    }
    return out


def model_stats(model: Any, tokenizer: Any, *, speed: bool = True, new_tokens: int = 64, repeats: int = 3
                ) -> dict[str, Any]:
    """Parameter count (tied weights once), parameter bytes, dtype, and (optionally) generation tokens/s."""
    params = unique_parameters(model)
    stats: dict[str, Any] = {
        "params": int(sum(p.numel() for p in params)),
        "param_bytes": int(sum(p.numel() * p.element_size() for p in params)),
        "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
        "device": str(params[0].device) if params else None,
    }
    if speed:
        stats["generation"] = generation_speed(model, tokenizer, new_tokens=new_tokens, repeats=repeats)
    return stats
