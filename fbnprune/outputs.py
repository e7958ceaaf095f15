"""Checks on an output directory, made before any model is loaded.

A run computes for minutes and writes its output only at the end (atomically, see
:func:`fbnprune.export.hf.atomic_dir`), so a directory it cannot write, or one it must not replace, has to be
refused at the start: otherwise the mistake costs the whole run. Replacing is a rename plus a recursive delete
of the old directory, so only a directory that an earlier fbnprune run wrote can be replaced, and only when the
user asks for it; any other non-empty directory (a home directory, a checkout) is never replaced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fbnprune.errors import UserError

# Files by which an earlier run's output is recognised: run / prune / evaluate write report.json, analyze writes
# analysis.json, a bare export directory holds fbnprune_export.json.
OUTPUT_MARKERS = ("report.json", "analysis.json", "fbnprune_export.json")


def _package_dir() -> Path:
    import fbnprune

    return Path(fbnprune.__file__).resolve().parent


def is_previous_output(path: Path) -> bool:
    """Whether ``path`` is a directory an earlier fbnprune run wrote."""
    return any((path / m).is_file() for m in OUTPUT_MARKERS)


def check_output_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an output directory that the end of the run could not write or must not replace.

    Refused, as a :class:`UserError`: a path inside the installed package (package data would be replaced, and
    the next ``pip install`` would lose it); a path whose nearest existing parent is not a directory fbnprune can
    create entries in (probed by creating and removing a temporary directory there, since permission bits do not
    tell, e.g. under ``/proc`` or on a read-only mount); an existing file; an earlier run's output unless
    ``overwrite``; any other non-empty directory. An empty directory is accepted. Nothing is left behind.

    Returns:
        ``path`` as a :class:`Path`.
    """
    out = Path(path)
    resolved = out.expanduser().resolve()
    package = _package_dir()
    if resolved == package or package in resolved.parents:
        raise UserError(f"output directory {out} is inside the installed fbnprune package ({package}); "
                        "choose a directory outside it")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"output directory {out} exists and is not a directory")
        if any(out.iterdir()):
            if not is_previous_output(out):
                raise UserError(f"output directory {out} exists and holds files that no fbnprune run wrote; "
                                "choose a new or empty directory")
            if not overwrite:
                raise UserError(f"output directory {out} holds an earlier run's output; pass --overwrite "
                                "(run(..., overwrite=True)) to replace it, or choose another output_dir")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create output directory {out}: {parent} is not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".fbnprune-probe.", dir=parent)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {parent} is not writable ({e.strerror or e})") from e
    os.rmdir(probe)
    return out
