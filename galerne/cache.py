"""Caches bounded by the bytes they hold, not by their number of entries.

Request-derived keys (JSON schemas, grammars) can be megabytes each: an LRU of
256 entries of such keys is gigabytes, and it never shrinks. A ``ByteLRU`` keeps
the total size of its entries (keys and values, as its caller measures them)
under ``max_bytes``, evicting the least recently used, and does not keep an
entry bigger than ``max_item_bytes`` at all (one such entry would evict all the
small, often reused ones: tools sent with every request).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


def text_bytes(*values: Any) -> int:
    """What strings (or None) take in memory."""
    return sum(sys.getsizeof(v) for v in values if v is not None)


class ByteLRU(Generic[K, V]):
    """A thread-safe LRU mapping whose entries take at most ``max_bytes`` together."""

    def __init__(self, max_bytes: int, max_item_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.max_item_bytes = max_bytes // 4 if max_item_bytes is None else max_item_bytes
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: K, default: Any = None) -> V | Any:
        with self._lock:
            entry = self._data.get(key, _MISSING)
            if entry is _MISSING:
                return default
            self._data.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V, nbytes: int) -> None:
        """Keep ``value`` under ``key``; ``nbytes``: what the entry takes (key and value)."""
        if nbytes > self.max_item_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._data[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes:
                _, (_, size) = self._data.popitem(last=False)
                self._bytes -= size

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data


def byte_cached(max_bytes: int, max_item_bytes: int | None = None) -> Callable:
    """``functools.lru_cache`` for a function of strings that returns a string or None,
    bounded by bytes (``ByteLRU``). The wrapped function has ``cache`` (the ByteLRU)."""

    def decorate(fn: Callable[..., str | None]) -> Callable[..., str | None]:
        cache: ByteLRU = ByteLRU(max_bytes, max_item_bytes)

        @functools.wraps(fn)
        def wrapper(*args: str) -> str | None:
            found = cache.get(args, _MISSING)
            if found is not _MISSING:
                return found
            result = fn(*args)
            cache.put(args, result, text_bytes(*args, result) + 64 * (len(args) + 1))
            return result

        wrapper.cache = cache  # type: ignore[attr-defined]
        return wrapper

    return decorate
