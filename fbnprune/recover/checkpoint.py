"""Checkpoints of a recovery run: enough to continue it as if it had never stopped.

A checkpoint holds the trainable tensors (LoRA adapters or the trained modules' weights), the optimizer state,
the schedule's position (steps, tokens and seconds spent), the RNG state and the data position (pass over the
text and the next window). A directory belongs to one run, identified by a fingerprint of the settings, the
training text and the starting weights of teacher and student: a run resumes only from its own checkpoints, and
an explicit directory holding another run's is an error, not a silent restart. Only the latest checkpoint is
kept; files are written under a temporary name and renamed, so a crash while saving leaves the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fbnprune.errors import UserError
from fbnprune.recover.config import RecoverConfig

FINGERPRINT = "fingerprint.json"
# settings that say where and how often to save, not what is trained: changing them keeps the checkpoints valid
NOT_FINGERPRINTED = {"checkpoint_every", "checkpoint_dir", "keep_checkpoints"}


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(cfg: RecoverConfig, text_sha256: str, teacher: nn.Module, student: nn.Module) -> dict[str, Any]:
    """What identifies a recovery run (see module docstring); ``key`` is its hash."""
    fp = {"settings": cfg.model_dump(mode="json", exclude=NOT_FINGERPRINTED), "text": text_sha256,
          "teacher": weights_hash(teacher), "student": weights_hash(student)}
    fp["key"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
    return fp


class Checkpoints:
    """The checkpoint directory of one run.

    Example:
        >>> ck = Checkpoints("/tmp/ck", fp)  # doctest: +SKIP
        >>> ck.save(10, state); ck.load_latest()["step"]  # doctest: +SKIP
        10
    """

    def __init__(self, directory: str | Path, fp: dict[str, Any]) -> None:
        self.dir = Path(directory).expanduser()
        self.fp = fp
        path = self.dir / FINGERPRINT
        if path.is_file():
            other = json.loads(path.read_text())
            if other.get("key") != fp["key"]:
                changed = [k for k in ("settings", "text", "teacher", "student") if other.get(k) != fp.get(k)]
                raise UserError(f"recover.checkpoint_dir {self.dir} holds checkpoints of another run (different "
                                f"{', '.join(changed) or 'fingerprint'}); remove it or choose another directory")
        elif self.dir.exists() and any(self.dir.iterdir()):
            raise UserError(f"recover.checkpoint_dir {self.dir} is not empty and holds no recovery checkpoints")

    def _files(self) -> list[Path]:
        return sorted(self.dir.glob("step-*.pt"))

    def latest(self) -> Path | None:
        files = self._files()
        return files[-1] if files else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        fp_path = self.dir / FINGERPRINT
        if not fp_path.is_file():
            fp_path.write_text(json.dumps(self.fp, indent=2))
        path = self.dir / f"step-{step:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in self._files():
            if old != path:
                old.unlink()
        return path

    def load_latest(self) -> dict[str, Any] | None:
        path = self.latest()
        if path is None:
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
