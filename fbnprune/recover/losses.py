"""Distillation losses: KL on the logits (full or against cached top-k), language-model loss, and two intermediate
losses (MLP outputs; functional-network activity).

KL(teacher || student) on the next-token distributions at temperature ``T``, scaled by ``T^2`` so that its
gradients keep their size across temperatures (Hinton et al., 2015, arXiv 1503.02531). Minitron (arXiv
2407.14679) found the logits KL enough on its own after width pruning; the intermediate losses are options.

The intermediate losses are relative mean squared errors per layer, ``sum (s - t)^2 / sum t^2``, averaged over
layers, so layers of different scale weigh the same. Position 0 is left out of them: the attention-sink token's
MLP output is hundreds of times a normal token's (SmolLM2) and would be the whole loss.

Network activity: for each functional network of a layer, the mean activation ``h`` (the down projection's input)
of its members per token. Pruning removed some members from the student, so teacher and student are both
averaged over the members the student kept (dense indices mapped to the student's positions by the keep plan);
a network with no kept member is left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fbnprune.arch import MLPAdapter
from fbnprune.errors import UserError


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) at ``temperature``, times ``temperature^2``."""
    v = student_logits.shape[-1]
    lq = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, -1)
    lp = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, -1)
    return F.kl_div(lq, lp, log_target=True, reduction="batchmean") * temperature**2


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ``k`` most likely next tokens per position and their log-probabilities at ``temperature``
    (normalised over the whole vocabulary), as ``(indices int32, log-probs float32)``."""
    lp = F.log_softmax(teacher_logits.float() / temperature, -1)
    top, idx = lp.topk(k, dim=-1)
    return idx.to(torch.int32), top


def topk_kl_loss(student_logits: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over ``k + 1`` outcomes: the teacher's top-k tokens and "any other token".

    This is the exact KL between the two distributions coarsened to those outcomes (a lower bound of the full
    KL, equal to it when the teacher's mass outside the top k is 0), times ``temperature^2``.
    """
    v = student_logits.shape[-1]
    lq = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, -1)
    idx = top_idx.reshape(-1, top_idx.shape[-1]).long()
    lp_top = top_logp.reshape(-1, top_logp.shape[-1]).float()
    lq_top = lq.gather(-1, idx)
    # log of the mass outside the top k: log(1 - sum exp), computed stably with log1p
    lp_rest = torch.log1p(-lp_top.exp().sum(-1).clamp(max=1 - 1e-6))
    lq_rest = torch.log1p(-lq_top.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (lp_top.exp() * (lp_top - lq_top)).sum(-1) + lp_rest.exp() * (lp_rest - lq_rest)
    return kl.mean() * temperature**2


def lm_loss(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the student on the training text."""
    logits = student_logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def relative_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``sum (s - t)^2 / sum t^2``, position 0 left out (see module docstring)."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s[:, 1:].float(), t[:, 1:].float()
        terms.append(((s - t) ** 2).sum() / (t**2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


@contextmanager
def taps(model: nn.Module, adapter: MLPAdapter, *, mlp_out: bool, h: bool) -> Iterator[dict[str, list[Any]]]:
    """Record, during forward passes inside the block, every layer's MLP output and/or down-projection input.

    Yields ``{"mlp_out": [...], "h": [...]}`` filled layer by layer (cleared by the caller between batches);
    the hooks are always removed.
    """
    got: dict[str, list[Any]] = {"mlp_out": [], "h": []}
    handles = []
    try:
        for mlp in adapter.mlps(model):
            if mlp_out:
                handles.append(mlp.register_forward_hook(lambda _m, _i, out: got["mlp_out"].append(out)))
            if h:
                handles.append(adapter.down_module(mlp).register_forward_pre_hook(
                    lambda _m, args: got["h"].append(args[0])))
        yield got
    finally:
        for hd in handles:
            hd.remove()


class NetworkMaps:
    """Per layer, two averaging matrices: ``teacher`` ``(n, N_dense)`` and ``student`` ``(n, N_kept)``, row ``c``
    averaging the kept members of network ``c`` (see module docstring), so ``h @ M.T`` is the activity.

    Example:
        >>> maps = NetworkMaps.from_members([torch.tensor([[1, 1, 0, 1]], dtype=torch.bool)], [torch.tensor([0, 3])])
        >>> maps.teacher[0].tolist(), maps.student[0].tolist()
        ([[0.5, 0.0, 0.0, 0.5]], [[0.5, 0.5]])
    """

    def __init__(self, teacher: list[torch.Tensor], student: list[torch.Tensor], networks: list[int]) -> None:
        self.teacher = teacher
        self.student = student
        self.networks = networks  # networks with a kept member, per layer

    @classmethod
    def from_members(cls, members: list[torch.Tensor], keep: list[torch.Tensor]) -> NetworkMaps:
        """``members[l]``: boolean ``(n_net, N_dense)``; ``keep[l]``: the dense indices the student kept (sorted)."""
        teacher, student, counts = [], [], []
        for m, k in zip(members, keep, strict=True):
            k = k.long().sort().values
            kept = m[:, k]  # (n_net, N_kept): membership among the kept neurons, in the student's order
            rows = kept.any(1)
            kept = kept[rows].float()
            w = kept / kept.sum(1, keepdim=True)
            t = torch.zeros(w.shape[0], m.shape[1])
            t[:, k] = w
            teacher.append(t)
            student.append(w)
            counts.append(int(rows.sum()))
        return cls(teacher, student, counts)

    @classmethod
    def from_networks(cls, networks: Any, keep: list[torch.Tensor], run: int = 0) -> NetworkMaps:
        """From a :class:`~fbnprune.discover.NetworkSet` (dense indexing) and the keep plan's indices."""
        n_runs = min(networks.n_runs(i) for i in range(networks.n_layers))
        if run >= n_runs:
            raise UserError(f"recover.network_run {run}: the networks hold {n_runs} run(s)")
        return cls.from_members([networks.networks(i, run) for i in range(networks.n_layers)], keep)

    def loss(self, student_h: list[torch.Tensor], teacher_h: list[torch.Tensor]) -> torch.Tensor:
        """Relative MSE of the networks' activity, student vs teacher, averaged over layers with networks."""
        s_act, t_act = [], []
        for i, (s, t) in enumerate(zip(student_h, teacher_h, strict=True)):
            if self.networks[i] == 0:
                continue
            s_act.append(s.float() @ self.student[i].to(s.device).T)
            t_act.append(t.float() @ self.teacher[i].to(t.device).T)
        if not s_act:
            return torch.zeros((), device=student_h[0].device)
        return relative_mse(s_act, t_act)
