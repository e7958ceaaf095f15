"""Error types. A :class:`UserError` is a mistake the user can fix (bad recipe, unknown model, missing
file): the CLI prints its message on one line and exits 2, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the CLI reports it in one line (exit code 2)."""


class UnknownKeyError(UserError, KeyError):
    """An unknown registry key; the message lists known keys and close matches."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class PeerFailure(RuntimeError):
    """Another process of a multi-process run failed or stopped answering, so this one stops too (exit code 1);
    the message names the rank and its error (:mod:`fbnprune.distributed`)."""
