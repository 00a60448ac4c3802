"""Typed name -> entry tables with entry-point discovery and "did you mean" errors."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from pipeline.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A table of named entries of one kind.

    Parameters
    ----------
    kind
        What the entries are, used in messages ("segmenter").
    group
        Entry-point group scanned once, lazily, for third-party entries.
    """

    def __init__(self, kind: str, *, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, T] = {}
        self._loaded_plugins = group is None

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; a second entry under one name is an error."""
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """Return the entry named ``name`` or raise :class:`UnknownNameError`."""
        self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        self._load_plugins()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        self._load_plugins()
        return name in self._entries

    def _unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        known = ", ".join(self.names())
        return f"unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {known}."

    def _load_plugins(self) -> None:
        if self._loaded_plugins:
            return
        self._loaded_plugins = True
        for ep in entry_points(group=self.group or ""):
            if ep.name not in self._entries:
                self._entries[ep.name] = ep.load()
