"""The training loop: AdamW, warm-up + cosine (or constant) learning rate over the budget, gradient accumulation,
gradient clipping, a time and/or token budget, a progress bar, and checkpoints to resume from.

The schedule runs on the budget's progress, the larger of the spent fractions of ``max_tokens`` and
``max_minutes``, so a run limited by time alone still decays its learning rate to the end. A resumed run equals
an uninterrupted one exactly when the budget is in tokens (the data order is a seeded permutation per pass over
the text, and the RNG state is restored); with a time budget the schedule follows the clock, which no rerun
repeats.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from fbnprune.arch import MLPAdapter
from fbnprune.models.load import autocast
from fbnprune.recover.checkpoint import Checkpoints
from fbnprune.recover.config import RecoverConfig
from fbnprune.recover.losses import NetworkMaps, kl_loss, lm_loss, relative_mse, taps, topk_kl_loss
from fbnprune.recover.teacher import Teacher
from fbnprune.recover.trainable import trainable_parameters


@dataclass
class State:
    """Where training stands: what a checkpoint needs besides tensors (all plain numbers)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    epoch: int = 0
    pos: int = 0  # next micro-batch of this pass over the text
    history: list[list[float]] = field(default_factory=list)  # [step, tokens, loss, lr] per optimizer step


def lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """Learning-rate multiplier at ``progress`` (0..1) of the budget: linear warm-up, then cosine to 0 or flat."""
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (p - warmup) / (1.0 - warmup)))


def step_ramp(step: int, warmup_steps: int) -> float:
    """Multiplier of optimizer step ``step`` (1-based) during a warm-up counted in steps: ``step / warmup_steps``."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def progress_of(cfg: RecoverConfig, tokens: int, seconds: float) -> float:
    """Spent fraction of the budget: the larger of the token and time fractions."""
    parts = []
    if cfg.max_tokens is not None:
        parts.append(tokens / cfg.max_tokens)
    if cfg.max_minutes is not None:
        parts.append(seconds / (60.0 * cfg.max_minutes))
    return max(parts)


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _next_rows(state: State, n: int, batch: int, seed: int) -> torch.Tensor:
    """The next micro-batch's window indices; a pass ends when fewer than ``batch`` windows are left."""
    if state.pos + batch > n:
        state.epoch += 1
        state.pos = 0
    rows = _order(n, seed, state.epoch)[state.pos : state.pos + batch]
    state.pos += batch
    return rows


def _losses(cfg: RecoverConfig, logits: torch.Tensor, x: torch.Tensor, target: dict[str, Any],
            got: dict[str, list[Any]], maps: NetworkMaps | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if cfg.kl_weight > 0:
        out["kl"] = (topk_kl_loss(logits, target["top_idx"], target["top_logp"], cfg.temperature)
                     if "top_idx" in target else kl_loss(logits, target["logits"], cfg.temperature))
    if cfg.lm_weight > 0:
        out["lm"] = lm_loss(logits, x)
    if cfg.mlp_weight > 0:
        out["mlp"] = relative_mse(got["mlp_out"], target["mlp_out"])
    if cfg.network_weight > 0:
        assert maps is not None
        out["network"] = maps.loss(got["h"], target["h"])
    return out


def train_(model: nn.Module, tapped: nn.Module, adapter: MLPAdapter, teacher: Teacher, cfg: RecoverConfig, *,
           maps: NetworkMaps | None = None, checkpoints: Checkpoints | None = None, progress: bool = True,
           on_step: Callable[[State], None] | None = None) -> dict[str, Any]:
    """Train ``model``'s trainable parameters towards ``teacher`` within the budget of ``cfg``.

    ``tapped`` is the plain model inside ``model`` (inside the peft wrapper, for LoRA), whose MLPs the
    intermediate losses read. ``on_step`` is called after every optimizer step (and its checkpoint). Returns the
    training record: steps, tokens, seconds, why it stopped, the loss curve.
    """
    from tqdm.auto import tqdm

    params = trainable_parameters(model)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = State()
    resumed = None
    saved = checkpoints.load_latest() if checkpoints is not None else None
    if saved is not None:
        with torch.no_grad():
            for name, t in saved["trainable"].items():
                params[name].copy_(t)
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        state = State(**saved["state"])
        resumed = state.step
    weights = {"kl": cfg.kl_weight, "lm": cfg.lm_weight, "mlp": cfg.mlp_weight, "network": cfg.network_weight}
    n, device = teacher.ids.shape[0], next(iter(params.values())).device
    tokens0, seconds0 = state.tokens, state.seconds
    t0 = time.perf_counter() - state.seconds  # the clock continues where a resumed run stopped
    stop = None
    bar = tqdm(total=cfg.max_tokens or round(60 * (cfg.max_minutes or 0)), initial=0, disable=not progress,
               desc="recover (distilling)", unit="tok" if cfg.max_tokens else "s")
    bar.update(state.tokens if cfg.max_tokens else round(state.seconds))
    model.train()
    try:
        while True:
            if cfg.max_tokens is not None and state.tokens >= cfg.max_tokens:
                stop = "max_tokens"
                break
            if cfg.max_minutes is not None and state.seconds >= 60 * cfg.max_minutes:
                stop = "max_minutes"
                break
            step_tokens = cfg.grad_accum * cfg.micro_tokens
            lr = cfg.lr * lr_factor(progress_of(cfg, state.tokens + step_tokens, state.seconds), cfg.warmup,
                                    cfg.schedule) * step_ramp(state.step + 1, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            total, parts = 0.0, {k: 0.0 for k, w in weights.items() if w > 0}
            for _ in range(cfg.grad_accum):
                rows = _next_rows(state, n, cfg.batch_size, cfg.seed)
                x = teacher.ids[rows].to(device)
                target = teacher(rows)
                with taps(tapped, adapter, mlp_out=cfg.mlp_weight > 0, h=cfg.network_weight > 0) as got, \
                        autocast(device, cfg.precision):
                    logits = model(input_ids=x, use_cache=False).logits
                terms = _losses(cfg, logits, x, target, got, maps)
                loss = sum(weights[k] * v for k, v in terms.items()) / cfg.grad_accum
                loss.backward()
                total += loss.item()
                for k, v in terms.items():
                    parts[k] += v.item() / cfg.grad_accum
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            state.step += 1
            state.tokens += step_tokens
            before = state.seconds
            state.seconds = time.perf_counter() - t0
            state.history.append([state.step, state.tokens, round(total, 6), lr,
                                  *(round(v, 6) for v in parts.values())])
            bar.update(step_tokens if cfg.max_tokens else round(state.seconds) - round(before))
            rate = (state.tokens - tokens0) / max(state.seconds - seconds0, 1e-9)
            bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{rate:.0f}")
            if checkpoints is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                checkpoints.save(state.step, {
                    "trainable": {k: p.detach().cpu().clone() for k, p in params.items()},
                    "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "state": asdict(state),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})
            if on_step is not None:
                on_step(state)
    finally:
        bar.close()
        model.eval()
    return {"state": state, "stop": stop, "resumed_from_step": resumed,
            "loss_terms": [k for k, w in weights.items() if w > 0],
            "session_tokens": state.tokens - tokens0, "session_seconds": state.seconds - seconds0}
