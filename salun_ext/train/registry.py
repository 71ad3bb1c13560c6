"""Registry: name -> method class, one per domain; the CLIs read their choices from them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

from salun_ext.utils.errors import UsageError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Ordered name -> class, with aliases (other spellings users type) and a clear error for unknown names.

    METHODS = Registry("classification method")
    @METHODS.register                      # uses the class's `name`
    class SalUn(UnlearnMethod): name = "salun"
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        self.aliases: dict[str, str] = {}

    def register(self, cls: T) -> T:
        name = cls.name  # type: ignore[attr-defined]
        if name in self._items:
            raise RuntimeError(f"{self.what} {name!r} is registered twice")
        self._items[name] = cls
        return cls

    def alias(self, **aliases: str) -> None:
        for other, name in aliases.items():
            self.aliases[other] = name

    def key(self, name: str) -> str:
        """The canonical name ('SalUn-soft' -> 'salun_soft', an alias -> its method); UsageError when unknown."""
        key = str(name).strip().lower()
        if key in self._items:  # a registered name as spelled (diffusion's "esd-x")
            return key
        key = key.replace("-", "_")
        key = self.aliases.get(key, key)
        if key not in self._items:
            raise UsageError(f"unknown {self.what} {name!r}; available: {', '.join(self._items)}")
        return key

    def get_class(self, name: str) -> T:
        return self._items[self.key(name)]

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
