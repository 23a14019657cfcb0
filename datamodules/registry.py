"""Name registries filled by the modules that define their entries (timm's `@register_model` pattern).

A `Registry` is the only list of its names. Its entries register themselves when their module is imported;
the registry imports, on its first lookup, every module of its package (so a new file is found without
editing an `__init__.py`) and then every module named in its plugin environment variable (comma-separated
module names on `sys.path`, e.g. `SYNFER_SSL_METHODS=mypkg.mymethod`; see docs/ARCHITECTURE.md "Adding things").
Discovery is lazy so that importing a registry never imports its (possibly heavy) entries.
"""
from __future__ import annotations

import difflib
import importlib
import os
import pkgutil
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not registered; the message lists the registered names and the closest ones."""


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str, plugins_env: str) -> None:
        self.kind = kind  # what an entry is, for messages ("SSL method", "dataset format")
        self.package = package
        self.plugins_env = plugins_env
        self._entries: dict[str, T] = {}
        self._discovered = False
        self._discovering = False

    def register(self, name: str, entry: T) -> T:
        known = self._entries.get(name)
        if known is not None and known is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice: {_where(known)} and {_where(entry)}")
        self._entries[name] = entry
        return entry

    def discover(self) -> None:
        """Import the package's modules and the plugins once (again after a failed import)."""
        if self._discovered or self._discovering:  # a module may look the registry up while it is imported
            return
        self._discovering = True
        try:
            package = importlib.import_module(self.package)
            for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
                importlib.import_module(f"{self.package}.{info.name}")
            for name in filter(None, (n.strip() for n in os.environ.get(self.plugins_env, "").split(","))):
                try:
                    importlib.import_module(name)
                except ImportError as exc:
                    raise ImportError(f"{self.plugins_env}={os.environ[self.plugins_env]}: cannot import {name!r} "
                                      f"({exc}); expected a module on sys.path that registers a {self.kind}") from exc
            self._discovered = True
        finally:
            self._discovering = False

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def get(self, name: str, *, key: str = "") -> T:
        """The entry of `name`; `key` (the config key the name came from) goes into the error."""
        self.discover()
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), list(self._entries), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            where = f"{key}={name!r}" if key else repr(name)
            raise UnknownNameError(f"{where}: unknown {self.kind}; expected one of {', '.join(self.names())}.{hint} "
                                   f"(a new one registers itself in {self.package} or a module in "
                                   f"{self.plugins_env})")
        return self._entries[name]

    def items(self) -> Iterator[tuple[str, T]]:
        self.discover()
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries


def _where(entry: object) -> str:
    target = getattr(entry, "load", None) or getattr(entry, "cls", None) or entry
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"
