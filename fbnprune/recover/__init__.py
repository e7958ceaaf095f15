"""Recover stage: knowledge distillation from the dense model (teacher) into the pruned one (student).

The student learns the teacher's next-token distributions (KL on the logits, optionally plus the language-model
loss and intermediate losses on MLP outputs or functional-network activity) through peft LoRA adapters, merged
into the weights at the end, or by training chosen projections' own weights. Entry point: :func:`recover_`;
``docs/recovery.md`` describes the options and what is measured.

Example recipe section::

    recover:
      method: lora
      rank: 16
      target_modules: [all]
      data: [c4, technical]
      max_minutes: 15
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.recover.checkpoint import Checkpoints, fingerprint
from fbnprune.recover.config import RecoverConfig
from fbnprune.recover.data import TrainingText, training_text
from fbnprune.recover.figure import loss_figure
from fbnprune.recover.losses import NetworkMaps
from fbnprune.recover.teacher import Teacher
from fbnprune.recover.train import State, train_
from fbnprune.recover.trainable import full_, lora_, resolve_targets, trainable_parameters


def _network_maps(student: nn.Module, cfg: RecoverConfig, networks: Any, plan: Any) -> NetworkMaps:
    if networks is None or plan is None:
        raise UserError("recover.network_weight > 0 needs the functional networks and the keep plan "
                        "(a recipe whose prune or discover stage finds networks)")
    maps = NetworkMaps.from_networks(networks, list(plan.keep), cfg.network_run)
    adapter = get_adapter(student)
    widths = [adapter.width(m) for m in adapter.mlps(student)]
    if [s.shape[1] for s in maps.student] != widths:
        raise UserError(f"recover: the keep plan's widths {[len(k) for k in plan.keep]} are not the student's "
                        f"{widths}")
    return maps


def _mean_loss(rows: list[list[float]]) -> float | None:
    return round(sum(r[2] for r in rows) / len(rows), 6) if rows else None


def recover_(
    teacher: nn.Module,
    student: nn.Module,
    tokenizer: Any,
    cfg: RecoverConfig,
    *,
    text: TrainingText | None = None,
    plan: Any = None,
    networks: Any = None,
    exclude: Iterable[str] = (),
    progress: bool = True,
    on_step: Callable[[State], None] | None = None,
) -> dict[str, Any]:
    """Distil ``teacher`` into ``student`` in place (LoRA adapters are merged into it); returns the record.

    Args:
        teacher: the dense model (not changed).
        student: the pruned model; trained in place, with the same modules and shapes afterwards.
        tokenizer: for the training text (when ``text`` is not given).
        cfg: the settings.
        text: training windows made earlier (:func:`training_text`), else made here.
        plan / networks: the keep plan and :class:`~fbnprune.discover.NetworkSet`, for the network loss.
        exclude: sources that must not be trained on (the run's evaluation text).
        on_step: called after every optimizer step with the training state (tests use it to stop a run).

    Everything that can be wrong with the settings (targets this model lacks, missing networks, a source with
    too little text, another run's checkpoints) raises :class:`UserError` before the first step.
    """
    t0 = time.perf_counter()
    adapter = get_adapter(student)
    targets = resolve_targets(student, adapter, list(cfg.target_modules or []))
    vocab = student.get_output_embeddings().weight.shape[0]
    if cfg.teacher_topk is not None and cfg.teacher_topk >= vocab:
        raise UserError(f"recover.teacher_topk {cfg.teacher_topk} is not below the vocabulary size {vocab}")
    maps = _network_maps(student, cfg, networks, plan) if cfg.network_weight > 0 else None
    if text is None:
        text = training_text(tokenizer, cfg, model=teacher, exclude=exclude)
    checkpoints = None
    if cfg.checkpoint_every is not None:
        fp = fingerprint(cfg, text.sha256, teacher, student)
        if cfg.checkpoint_dir is not None:
            directory = Path(cfg.checkpoint_dir)
        else:
            from fbnprune.paths import cache_dir

            directory = cache_dir() / "recover" / fp["key"][:16]
        checkpoints = Checkpoints(directory, fp)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    if cfg.method == "lora":
        model = lora_(student, targets, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, seed=cfg.seed)
    else:
        model = full_(student, targets)
    n_trainable = sum(p.numel() for p in trainable_parameters(model).values())
    teach = Teacher(teacher, adapter, text.ids, chunk=cfg.batch_size, topk=cfg.teacher_topk,
                    temperature=cfg.temperature, mlp_out=cfg.mlp_weight > 0, h=cfg.network_weight > 0,
                    precision=cfg.precision)
    setup = time.perf_counter() - t0
    out = train_(model, student, adapter, teach, cfg, maps=maps, checkpoints=checkpoints, progress=progress,
                 on_step=on_step)
    if cfg.method == "lora":
        model.merge_and_unload()  # the adapters become part of the student's own weights (its bias kept)
    for n, p in student.named_parameters():
        p.requires_grad_(flags.get(n, True))
    student.eval()
    if checkpoints is not None and not cfg.keep_checkpoints:
        checkpoints.remove()
    st: State = out["state"]
    curve = st.history
    k = max(1, min(10, len(curve) // 10))  # steps averaged for the start and end loss (one batch is noisy)
    return {
        "method": cfg.method,
        "target_modules": list(cfg.target_modules or []),
        "targets": len(targets),
        "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout} if cfg.method == "lora" else None,
        "trainable_params": n_trainable,
        "data": text.info(),
        "budget": {"max_minutes": cfg.max_minutes, "max_tokens": cfg.max_tokens},
        "stop": out["stop"],
        "steps": st.step,
        "tokens": st.tokens,
        "passes_over_text": round(st.tokens / text.n_tokens, 3),
        "minutes": round(st.seconds / 60, 3),
        "tokens_per_s": round(out["session_tokens"] / out["session_seconds"], 1) if out["session_seconds"] else None,
        "setup_seconds": round(setup, 1),
        "resumed_from_step": out["resumed_from_step"],
        "loss_terms": out["loss_terms"],
        "loss_window": k,
        "loss_start": _mean_loss(curve[:k]),
        "loss_end": _mean_loss(curve[-k:]),
        "teacher": teach.info(),
        "curve_columns": ["step", "tokens", "loss", "lr", *out["loss_terms"]],
        "curve": curve,
    }


__all__ = ["RecoverConfig", "TrainingText", "loss_figure", "recover_", "training_text"]
