"""A small generic registry: explicit registration, aliases, duplicate checks and helpful errors.

Used for architecture adapters, neuron scorers, text sources and decomposers so that extending
fbnprune means adding one file and one ``register`` call.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fbnprune.errors import UnknownKeyError

T = TypeVar("T")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


class Registry(Generic[T]):
    """Maps lower-case names to objects.

    Example:
        >>> scorers = Registry("scorer")
        >>> @scorers.register("random")
        ... def random_scores(ctx): ...
        >>> scorers.get("random") is random_scores
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (and ``aliases``)."""

        def deco(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return deco

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        for key in (name, *aliases):
            if not _NAME.match(key):
                raise ValueError(f"{self.kind} name {key!r} must be lower case ([a-z0-9_.-])")
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered")
        self._items[name] = obj
        for a in aliases:
            self._aliases[a] = name

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or an alias of it; raises :class:`UnknownKeyError`."""
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = sorted(self._items)
        close = difflib.get_close_matches(name, [*known, *self._aliases], n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownKeyError(f"unknown {self.kind} {name!r}; known: {', '.join(known)}.{hint}")

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
