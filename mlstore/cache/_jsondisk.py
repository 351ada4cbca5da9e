"""The ``diskcache.Disk`` of the node-wide metadata tier: JSON text, nothing else.

diskcache pickles what it cannot store natively and unpickles what it reads back. The
metadata tier's file is shared by every process on the node, so a value planted in it
must never run code: this Disk stores text in the database row itself, and refuses,
when reading, every value stored in another mode.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["UnsafeValueError", "json_disk"]


class UnsafeValueError(ValueError):
    """A node-tier entry was not stored as JSON text (a planted pickle, a file entry)."""


@functools.cache
def json_disk() -> type[Any]:
    """The ``diskcache.Disk`` of the node tier: JSON text in the database, nothing else.

    Built on first use, so ``import mlstore`` does not import diskcache.
    """
    import diskcache

    class JSONDisk(diskcache.Disk):  # type: ignore[misc]
        """Stores ``str`` values (JSON text) in the database row itself; refuses keys
        that are not text and, on reading, every value stored in another mode (pickle,
        a file), so nothing it reads is ever unpickled or opened."""

        def __init__(self, directory: str, **_settings: Any) -> None:
            # The settings come from the database's own Settings table: not trusted.
            super().__init__(directory, min_file_size=0, pickle_protocol=0)

        def put(self, key: Any) -> tuple[Any, bool]:
            if type(key) is not str:
                raise UnsafeValueError("metadata keys are text")
            return key, True

        def get(self, key: Any, raw: bool) -> Any:
            if not raw or type(key) is not str:
                raise UnsafeValueError("a metadata key that is not text")
            return key

        def store(self, value: Any, read: bool, key: Any = None) -> tuple[Any, ...]:
            if type(value) is not str or read:
                raise UnsafeValueError("metadata values are JSON text")
            return 0, diskcache.core.MODE_RAW, None, value

        def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
            if mode != diskcache.core.MODE_RAW or filename is not None or type(value) is not str:
                raise UnsafeValueError(f"a metadata entry stored in mode {mode}, not as text")
            return value

    return JSONDisk
