"""Plain-dict registries filled by decorators (timm style): adding a method, dataset, backbone or
fusion is adding one module that registers itself."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable, Generic, TypeVar

from mmbench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._items: dict[str, T] = {}
        self._loaded = package is None

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        # import every module of the package once, so registration needs no central list
        if not self._loaded and self.package is not None:
            self._loaded = True
            pkg = importlib.import_module(self.package)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{mod.name}")

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise UserError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items


def describe(obj: Any) -> str:
    """First line of an object's docstring: the one-line description the CLI lists."""
    doc = (getattr(obj, "description", None) or obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
