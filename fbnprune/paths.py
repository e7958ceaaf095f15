"""Where fbnprune finds data and keeps caches.

* Data: ``$FBNPRUNE_DATA``, else ``../shared/data`` next to the checkout (or the current directory),
  when it exists. ``None`` means "no data here": callers fall back to data-free sources.
* Cache: ``$FBNPRUNE_CACHE``, else ``$XDG_CACHE_HOME/fbnprune``, else ``~/.cache/fbnprune``. Converted
  models and activations go there, never into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path | None:
    """The benchmark/calibration data directory, or ``None`` when none is available."""
    env = os.environ.get("FBNPRUNE_DATA")
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    for base in (_REPO_ROOT, Path.cwd()):
        p = (base / ".." / "shared" / "data").resolve()
        if p.is_dir():
            return p
    return None


def cache_dir() -> Path:
    """The user cache directory (created on demand)."""
    env = os.environ.get("FBNPRUNE_CACHE")
    if env:
        p = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        p = (Path(xdg) if xdg else Path.home() / ".cache") / "fbnprune"
    if not p.is_dir():  # created once; a rank of a multi-process run that only reads caches creates nothing
        p.mkdir(parents=True, exist_ok=True)
    return p
