"""A strict reader of tar streams, and the grouping of their members into samples.

Why not ``tarfile.open(mode="r|")``: its stream mode stops iterating, without an error,
at a damaged or truncated header anywhere but the first one, and at an archive cut short
exactly between two members. A shard cut short would then give a short epoch and no
error. Here the headers are walked one by one (each parsed and checksummed by
:meth:`tarfile.TarInfo.frombuf`); pax (``x``, ``g``) and GNU long-name (``L``, ``K``)
headers are followed, and anything short of a complete archive, up to its end-of-archive
marker, raises :class:`ShardFormatError` naming the shard and the member.

Members are read in order, each once, from a file read front to back: nothing is
seeked, and nothing past the end-of-archive marker is read.

Samples follow the WebDataset layout: consecutive regular members that share a key (the
member's path up to the first ``.`` of its file name) form one sample, keyed by the
rest of the file name (its extension): ``a/0001.jpg`` and ``a/0001.seg.png`` give
``{"__key__": "a/0001", "__url__": url, "jpg": ..., "seg.png": ...}``.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

from mlstore.errors import MlstoreError

__all__ = ["ShardFormatError", "group", "members", "split_name"]

BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(BLOCK)
_CHUNK = 1 << 20  # bytes read at a time when data is skipped
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_PAX = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)


class ShardFormatError(MlstoreError):
    """A shard is not a complete tar archive: a damaged header, member data cut short,
    an object that ends before its headers say it should, or no end-of-archive marker.

    The message names the shard and the member; rewrite (or re-upload) the shard.

    Attributes:
        url: the shard.
        member: the name of the member concerned, when it is known (``None`` when the
            header that would name it is the damaged part).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        operation: str | None = "read shard",
        member: str | None = None,
    ) -> None:
        self.member = member
        super().__init__(message, url=url, operation=operation)


class _Stream:
    """A file read front to back, with the offset reached and the last member seen."""

    def __init__(self, fh: IO[bytes], url: str) -> None:
        self._fh = fh
        self.url = url
        self.offset = 0
        self.last: str | None = None  # the last member read whole

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes: fewer only at the end of the object."""
        parts = []
        want = n
        while want > 0:
            got = self._fh.read(want)
            if not got:
                break
            parts.append(got)
            want -= len(got)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += len(data)
        return data

    def after(self) -> str:
        return f"after member {self.last!r}" if self.last is not None else "at its start"

    def error(self, what: str, member: str | None = None) -> ShardFormatError:
        return ShardFormatError(what, url=self.url, member=member)

    def data(self, size: int, member: str | None, what: str | None = None) -> bytes:
        """The ``size`` bytes of ``member`` (or of ``what``, an extended header) and
        the padding up to the next block."""
        at = self.offset
        data = self.read(size)
        padding = -size % BLOCK
        got_padding = len(self.read(padding)) if len(data) == size else 0
        if len(data) < size or got_padding < padding:
            raise self.error(
                f"{what or f'member {member!r}'} (data at byte {at}) is cut short: {size} "
                f"bytes announced, {len(data)} present; the shard is truncated, rewrite it",
                member,
            )
        return data

    def skip(self, size: int, member: str) -> None:
        """Read past ``size`` bytes of ``member`` (and their padding), keeping none."""
        left = size + (-size % BLOCK)
        at = self.offset
        while left:
            got = len(self.read(min(left, _CHUNK)))
            if not got:
                raise self.error(
                    f"member {member!r} (data at byte {at}) is cut short: {size} bytes "
                    "announced; the shard is truncated, rewrite it",
                    member,
                )
            left -= got


def members(fh: IO[bytes], url: str) -> Iterator[tuple[str, bytes]]:
    """The regular files of the tar archive read from ``fh``, in order: ``(name, data)``.

    Directories, links and other non-regular members are skipped.

    Raises:
        ShardFormatError: the archive is damaged or incomplete (see the module docstring).
    """
    stream = _Stream(fh, url)
    pax_global: dict[str, str] = {}
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        at = stream.offset
        block = stream.read(BLOCK)
        if len(block) < BLOCK:
            if at == 0 and not block:
                raise stream.error("the object is empty: not a tar archive")
            if not block:
                raise stream.error(
                    f"the shard ends {stream.after()} without the tar end-of-archive "
                    "marker: it was cut short, rewrite it",
                    stream.last,
                )
            raise stream.error(
                f"the shard ends inside the tar header at byte {at}, {stream.after()}: "
                "it was cut short, rewrite it",
                stream.last,
            )
        if block == _ZEROS:
            if pax or long_name is not None:
                raise stream.error(
                    f"the archive ends at byte {at} between an extended header and the "
                    "member it describes: the shard is damaged, rewrite it",
                    long_name or pax.get("path"),
                )
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            if at == 0:
                raise stream.error(
                    f"not a tar archive: its first header is invalid ({exc})"
                ) from None
            raise stream.error(
                f"the tar header at byte {at}, {stream.after()}, is damaged ({exc}); "
                "rewrite the shard"
            ) from None
        kind = info.type
        if kind in _PAX or kind == tarfile.XGLTYPE:
            records = _pax_records(
                stream.data(info.size, None, f"the pax header {stream.after()}"), stream, at
            )
            (pax_global if kind == tarfile.XGLTYPE else pax).update(records)
            continue
        if kind in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            payload = stream.data(info.size, None, f"the GNU long-name header {stream.after()}")
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        fields = {**pax_global, **pax} if pax_global else pax
        name = fields.get("path", long_name if long_name is not None else info.name)
        size = info.size
        if "size" in fields:
            try:
                size = int(fields["size"])
            except ValueError:
                raise stream.error(
                    f"member {name!r} (header at byte {at}) has an invalid pax size "
                    f"{fields['size']!r}; rewrite the shard",
                    name,
                ) from None
        pax, long_name = {}, None
        if kind == tarfile.GNUTYPE_SPARSE:
            raise stream.error(
                f"member {name!r} is a GNU sparse file, which shards cannot hold; "
                "write the shard without --sparse",
                name,
            )
        if kind in _REGULAR:
            data = stream.data(size, name)
            stream.last = name
            yield name, data
        else:
            stream.skip(size, name)
            stream.last = name


def _pax_records(payload: bytes, stream: _Stream, at: int) -> dict[str, str]:
    """The ``"<length> <key>=<value>\\n"`` records of a pax header."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        space = payload.find(b" ", pos)
        try:
            length = int(payload[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = payload[pos : pos + length]
        key, equals, value = record[space - pos + 1 : -1].partition(b"=")
        if length <= 0 or len(record) != length or not record.endswith(b"\n") or not equals:
            raise stream.error(
                f"the pax header at byte {at}, {stream.after()}, is damaged; rewrite the shard"
            )
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, or ``None`` for a name with no extension
    (such a member belongs to no sample and is skipped, as WebDataset does).

    >>> split_name("a.b/0001.seg.png")
    ('a.b/0001', 'seg.png')
    >>> split_name("a/README") is None
    True
    """
    folder, slash, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not (stem and dot and extension):
        return None
    return folder + slash + stem, extension


def group(files: Iterable[tuple[str, bytes]], url: str) -> Iterator[tuple[dict[str, Any], bool]]:
    """Consecutive members with one key as samples: ``(sample, is_last)``, where
    ``is_last`` says the archive ended after this sample (the shard is complete).

    Raises:
        ShardFormatError: a sample holds the same extension twice.
    """
    current: dict[str, Any] | None = None
    for name, data in files:
        parts = split_name(name)
        if parts is None:
            continue
        key, extension = parts
        if current is not None and current["__key__"] != key:
            yield current, False
            current = None
        if current is None:
            current = {"__key__": key, "__url__": url}
        elif extension in current:
            raise ShardFormatError(
                f"member {name!r} repeats the extension {extension!r} of sample {key!r}; "
                "each sample holds one file per extension",
                url=url,
                member=name,
            )
        current[extension] = data
    if current is not None:
        yield current, True
