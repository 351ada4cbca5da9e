"""Compact columns for large in-memory tables (a :class:`~mlstore.Manifest` of millions
of objects).

A Python ``str`` costs 49 bytes of header before its first character, and a list holds
8 more per item, so a million ETags kept as strings cost ~90 MB. The columns here keep
the same values in a few flat buffers:

- :class:`Strings`: UTF-8 text concatenated in one ``bytearray`` with an ``array('q')``
  of end offsets, so a 30-character key costs 38 bytes instead of ~87.
- :class:`Tokens`: optional version tokens and hashes. The common shapes are packed into
  a 16-byte slot per row: 32 hex digits (an S3 single-part ETag, with or without its
  quotes; an xxh3-128 or MD5 hex digest) as 16 raw bytes, a decimal integer (a GCS
  generation) and an Azure ETag (``"0x8DC..."``) as the number they spell, a local file's
  ``mtime_ns-size`` as its two numbers. Anything else goes to a small ``dict`` by row, so
  a value always comes back exactly as it went in.
"""

from __future__ import annotations

from array import array

__all__ = ["Strings", "Tokens"]


class Strings:
    """Append-only text column: one ``bytearray`` of UTF-8 and an offset per row."""

    __slots__ = ("_data", "_ends")

    def __init__(self) -> None:
        self._data = bytearray()
        self._ends = array("q")

    def append(self, text: str) -> None:
        self._data += text.encode("utf-8")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i > 0 else 0
        return self._data[start : self._ends[i]].decode("utf-8")

    def bytes_at(self, i: int) -> bytes:
        """Row ``i`` as UTF-8 bytes (cheaper to compare than decoding)."""
        start = self._ends[i - 1] if i > 0 else 0
        return bytes(self._data[start : self._ends[i]])

    def nbytes(self) -> int:
        return len(self._data) + self._ends.itemsize * len(self._ends)


_NONE, _QHEX, _HEX, _INT, _OTHER, _AZURE, _PAIR = 0, 1, 2, 3, 4, 5, 6


def _pack(value: str) -> tuple[int, bytes]:
    """The kind of ``value`` and its 16 packed bytes (``_OTHER``: it does not pack).

    Plain string tests, not regular expressions: this runs once a row when a manifest
    of millions of rows loads. ``bytes.fromhex`` also accepts capitals and spaces, so a
    value packs only if it comes back identical."""
    n = len(value)
    if n == 34 and value[0] == '"' and value[33] == '"':
        digits = value[1:33]
        try:
            packed = bytes.fromhex(digits)
        except ValueError:
            return _OTHER, b""
        return (_QHEX, packed) if packed.hex() == digits else (_OTHER, b"")
    if n == 32:
        try:
            packed = bytes.fromhex(value)
        except ValueError:
            return _OTHER, b""
        return (_HEX, packed) if packed.hex() == value else (_OTHER, b"")
    if 0 < n <= 18 and value.isascii() and value.isdigit() and (value[0] != "0" or n == 1):
        return _INT, int(value).to_bytes(16, "little")
    if 5 <= n <= 20 and value.startswith('"0x') and value[-1] == '"':  # an Azure ETag
        try:
            number = int(value[3:-1], 16)
        except ValueError:
            return _OTHER, b""
        if f'"0x{number:X}"' == value:
            return _AZURE, number.to_bytes(16, "little")
    if "-" in value and n <= 41 and value.isascii():  # a local file's mtime_ns-size
        first, _, second = value.partition("-")
        if first.isdigit() and second.isdigit():
            a, b = int(first), int(second)
            if a < 2**64 and b < 2**64 and f"{a}-{b}" == value:
                return _PAIR, a.to_bytes(8, "little") + b.to_bytes(8, "little")
    return _OTHER, b""


class Tokens:
    """Append-only column of ``str | None`` with the common token shapes packed."""

    __slots__ = ("_kinds", "_other", "_slots")

    def __init__(self) -> None:
        self._kinds = bytearray()
        self._slots = bytearray()  # 16 bytes a row, grown only once a row needs it
        self._other: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._kinds)

    def append(self, value: str | None) -> None:
        kinds = self._kinds
        if value is None:
            kinds.append(_NONE)
            return
        kind, packed = _pack(value)
        row = len(kinds)
        kinds.append(kind)
        if kind == _OTHER:
            self._other[row] = value
            return
        slots = self._slots
        if len(slots) < 16 * row:  # rows before this one held nothing packed
            slots.extend(bytes(16 * row - len(slots)))
        slots += packed

    def __getitem__(self, i: int) -> str | None:
        kind = self._kinds[i]
        if kind == _NONE:
            return None
        if kind == _OTHER:
            return self._other[i]
        packed = bytes(self._slots[16 * i : 16 * i + 16])
        if kind == _QHEX:
            return f'"{packed.hex()}"'
        if kind == _HEX:
            return packed.hex()
        if kind == _AZURE:
            return f'"0x{int.from_bytes(packed, "little"):X}"'
        if kind == _PAIR:
            a, b = int.from_bytes(packed[:8], "little"), int.from_bytes(packed[8:], "little")
            return f"{a}-{b}"
        return str(int.from_bytes(packed, "little"))

    def set(self, i: int, value: str | None) -> None:
        """Replace row ``i`` (rare: a re-read object's new version)."""
        if i < 0:
            i += len(self._kinds)
        self._other.pop(i, None)
        kind, packed = (_NONE, b"") if value is None else _pack(value)
        self._kinds[i] = kind
        if kind == _OTHER and value is not None:
            self._other[i] = value
        elif packed:
            end = 16 * (i + 1)
            if len(self._slots) < end:
                self._slots.extend(bytes(end - len(self._slots)))
            self._slots[end - 16 : end] = packed

    def known(self) -> bool:
        """Whether any row holds a value."""
        return any(self._kinds)

    def nbytes(self) -> int:
        return len(self._kinds) + len(self._slots) + 100 * len(self._other)
