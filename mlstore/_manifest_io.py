"""A :class:`~mlstore.Manifest` as a file: JSON Lines, or Parquet when pyarrow is installed.

JSON Lines: a header line ``{"mlstore_manifest": 1, "root": ..., "count": ...}``, then one
line an entry, ``{"key": ..., "size": ..., "version": ..., "content_hash": ...}`` (the
URL is ``root + key``; a field that is not known is left out). Parquet: the columns
``key``, ``size``, ``version``, ``content_hash`` and the header as the schema's
``mlstore_manifest`` metadata. Entries are parsed straight into the manifest's packed
columns, one line at a time, so loading never holds a million small objects.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from mlstore.errors import ConfigError

if TYPE_CHECKING:
    from mlstore.manifest import Manifest

__all__ = ["dump", "parse"]

_CHUNK = 1 << 20  # bytes of lines parsed in one json.loads
#: A str as a JSON string (the json module's own C encoder, as ensure_ascii=False uses).
_quote: Any = (
    getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
)
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False).encode


def _format(url: str) -> str:
    path = url.split("?", 1)[0].lower()
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise ConfigError(
        "cannot tell the manifest format from the name; end it in .jsonl or .parquet",
        url=url,
        operation="manifest",
    )


def _header(m: Manifest) -> dict[str, Any]:
    from mlstore.manifest import FORMAT_VERSION

    return {"mlstore_manifest": FORMAT_VERSION, "root": m.root, "count": len(m)}


def dump(m: Manifest, url: str) -> bytes:
    """``m`` as the bytes of a file named ``url`` (its suffix chooses the format)."""
    if _format(url) == "parquet":
        return _dump_parquet(m, url)
    lines = [_encode(_header(m))]
    quote = _quote
    keys, sizes, versions, hashes = m._keys, m._sizes, m._versions, m._hashes
    for i in range(len(m)):
        line = f'{{"key":{quote(keys[i])},"size":{sizes[i]}'
        version, content_hash = versions[i], hashes[i]
        if version is not None:
            line += f',"version":{quote(version)}'
        if content_hash is not None:
            line += f',"content_hash":{quote(content_hash)}'
        lines.append(line + "}")
    lines.append("")
    return "\n".join(lines).encode("utf-8")


def parse(m: Manifest, url: str, fh: IO[bytes]) -> None:
    """Fill the empty manifest ``m`` from the file ``fh`` read from ``url``.

    Raises:
        ConfigError: not a manifest, naming ``url`` and the line (or column) at fault.
    """
    if _format(url) == "parquet":
        _parse_parquet(m, url, fh.read())
        return

    def bad(line: int, what: str) -> ConfigError:
        return ConfigError(f"line {line}: {what}", url=url, operation="load manifest")

    header: Any = None
    try:
        header = json.loads(fh.readline())
    except ValueError:
        pass
    count = _check_header(header, lambda what: bad(1, what))
    m.root = header["root"]
    keys, sizes, versions, hashes = m._keys, m._sizes, m._versions, m._hashes
    previous = ""
    ordered = True
    base = 1  # lines read before this chunk
    number = 1
    while chunk := fh.readlines(_CHUNK):
        try:  # one C call for a chunk of lines: ~3x faster than json.loads a line
            parsed = json.loads(b"[" + b",".join(chunk) + b"]")
            if len(parsed) != len(chunk):  # a blank line, or two values on one
                raise ValueError("not one value a line")
            numbered: Any = zip(range(base + 1, base + 1 + len(chunk)), parsed, strict=True)
        except ValueError:  # a blank or a broken line: find it, line by line
            numbered = _lines(chunk, base, bad)
        base += len(chunk)
        for number, row in numbered:
            try:
                key, size = row["key"], row["size"]
                version, content_hash = row.get("version"), row.get("content_hash")
            except (TypeError, KeyError, AttributeError):
                raise bad(number, 'expected {"key": str, "size": int, ...}') from None
            if type(key) is not str or type(size) is not int or size < 0:
                raise bad(number, "key must be a string and size a non-negative integer")
            if not (version is None or type(version) is str):
                raise bad(number, "version must be a string")
            if not (content_hash is None or type(content_hash) is str):
                raise bad(number, "content_hash must be a string")
            if key <= previous:
                if key == previous:
                    raise bad(number, f"the key {key!r} appears twice")
                ordered = False
            previous = key
            keys.append(key)
            sizes.append(size)
            versions.append(version)
            hashes.append(content_hash)
    if len(m) != count:
        raise bad(number, f"the header says {count} entries but the file holds {len(m)}")
    if not ordered:
        m._sort()


def _lines(chunk: list[bytes], base: int, bad: Any) -> Iterator[tuple[int, Any]]:
    """The rows of ``chunk`` one line at a time, skipping blank lines, numbered from
    ``base + 1``: the slow path, which names the line that does not parse."""
    for number, line in enumerate(chunk, start=base + 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except ValueError:
            raise bad(number, "not valid JSON") from None


def _check_header(header: Any, bad: Any) -> int:
    from mlstore.manifest import FORMAT_VERSION

    if not isinstance(header, dict) or "mlstore_manifest" not in header:
        raise bad('not an mlstore manifest (expected a {"mlstore_manifest": 1, ...} header)')
    if header["mlstore_manifest"] != FORMAT_VERSION:
        raise bad(f"manifest format {header['mlstore_manifest']!r} is not {FORMAT_VERSION}")
    count, root = header.get("count"), header.get("root")
    if type(count) is not int or count < 0 or type(root) is not str:
        raise bad("the header needs a string root and a non-negative integer count")
    return count


def _pyarrow(url: str) -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "a .parquet manifest needs pyarrow (pip install pyarrow); or use .jsonl",
            url=url,
            operation="manifest",
        ) from None
    return pa, pq


def _dump_parquet(m: Manifest, url: str) -> bytes:
    pa, pq = _pyarrow(url)
    n = range(len(m))
    table = pa.table(
        {
            "key": pa.array([m._keys[i] for i in n], pa.string()),
            "size": pa.array(m._sizes, pa.int64()),
            "version": pa.array([m._versions[i] for i in n], pa.string()),
            "content_hash": pa.array([m._hashes[i] for i in n], pa.string()),
        }
    )
    table = table.replace_schema_metadata({"mlstore_manifest": json.dumps(_header(m))})
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


def _parse_parquet(m: Manifest, url: str, data: bytes) -> None:
    pa, pq = _pyarrow(url)

    def bad(what: str) -> ConfigError:
        return ConfigError(what, url=url, operation="load manifest")

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise bad(f"not a Parquet file ({type(exc).__name__})") from None
    meta = table.schema.metadata or {}
    try:
        header = json.loads(meta.get(b"mlstore_manifest", b""))
    except ValueError:
        header = None
    count = _check_header(header, lambda what: bad(f"metadata: {what}"))
    m.root = header["root"]
    columns = {"key": pa.string(), "size": pa.int64(), "version": pa.string()}
    columns["content_hash"] = pa.string()
    for name, kind in columns.items():
        if name not in table.column_names or table.schema.field(name).type != kind:
            raise bad(f"column {name!r} is missing or not of type {kind}")
    if table.column("key").null_count or table.column("size").null_count:
        raise bad("column 'key' or 'size' holds a null")
    keys, sizes = table.column("key").to_pylist(), table.column("size").to_pylist()
    versions = table.column("version").to_pylist()
    hashes = table.column("content_hash").to_pylist()
    ordered = all(a < b for a, b in itertools.pairwise(keys))
    for row in zip(keys, sizes, versions, hashes, strict=True):
        m._append(*row)
    if len(m) != count:
        raise bad(f"metadata says {count} entries but the file holds {len(m)}")
    if not ordered:
        m._sort()
