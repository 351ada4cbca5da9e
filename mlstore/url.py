"""Parsing and normalising storage URLs.

mlstore accepts:

=====================  ==========================================  =================
spelling               meaning                                     canonical form
=====================  ==========================================  =================
``s3://b/k``           Amazon S3 (and S3-compatible stores)         ``s3://b/k``
``gs://b/k``           Google Cloud Storage (``gcs://`` too)        ``gs://b/k``
``az://c/k``           Azure Blob (``abfs://``, ``abfss://`` too)   ``az://c/k``
``file:///p``          local file (bare paths, ``~``, relative;     ``file:///abs/p``
                       the path is literal, not %-decoded)
``memory://k``         in-process memory (tests, notebooks)         ``memory://k``
``http(s)://h/p``      read-only HTTP(S)                            unchanged
``mlstore://m/p``      mount ``m`` (one or more replicas)           ``mlstore://m/p``
=====================  ==========================================  =================

An unknown scheme is a :class:`~mlstore.errors.ConfigError` listing the supported ones.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from mlstore.errors import ConfigError, PermissionDeniedError, redact_url

__all__ = ["SCHEMES", "URL", "glob_regex", "parse_url", "resolve_mount", "safe_join"]

#: Accepted scheme -> canonical protocol.
SCHEMES: dict[str, str] = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "abfs": "az",
    "abfss": "az",
    "file": "file",
    "local": "file",
    "memory": "memory",
    "http": "http",
    "https": "https",
    "mlstore": "mlstore",
}

_BUCKETED = {"s3", "gs", "az", "mlstore"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# A Windows drive letter ("C:\x") is not a scheme.
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class URL:
    """A parsed, normalised storage URL.

    Attributes:
        protocol: canonical protocol: ``s3``, ``gs``, ``az``, ``file``, ``memory``,
            ``http``, ``https`` or ``mlstore``.
        bucket: bucket, container, host (http) or mount name; empty for ``file`` and
            ``memory``.
        path: the key inside the bucket (no leading ``/``), the absolute local path for
            ``file``, or path plus query for ``http``.
    """

    protocol: str
    bucket: str
    path: str

    def __str__(self) -> str:
        if self.protocol == "file":
            return "file://" + self.path
        if self.protocol in ("http", "https"):
            return f"{self.protocol}://{self.bucket}{self.path}"
        if self.protocol == "memory":
            return "memory://" + self.path
        if self.path:
            return f"{self.protocol}://{self.bucket}/{self.path}"
        return f"{self.protocol}://{self.bucket}"

    def __repr__(self) -> str:
        return f"URL({redact_url(str(self))!r})"

    @property
    def name(self) -> str:
        """The last path component."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> URL:
        """A URL below this one: ``URL('s3://b/a').join('x', 'y') == URL('s3://b/a/x/y')``."""
        tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if not tail:
            return self
        if self.protocol == "file":
            return URL("file", "", os.path.join(self.path, *tail.split("/")))
        base = self.path.rstrip("/")
        return URL(self.protocol, self.bucket, f"{base}/{tail}" if base else tail)


def _check_key(path: str, raw: str) -> None:
    if "\x00" in path:
        raise ConfigError("a URL must not contain a NUL character", url=raw, operation="parse")


# Remote URLs parse the same way whatever the working directory: their parse is cached
# (a read of a cached object then costs a dictionary look-up, not a parse).
_REMOTE = re.compile(r"^(?:s3|s3a|gs|gcs|az|abfss?|memory|https?|mlstore)://", re.IGNORECASE)


@functools.lru_cache(maxsize=65536)
def _parse_remote(url: str) -> URL:
    return _parse(url)


def parse_url(url: str | os.PathLike[str] | URL) -> URL:
    """Parse ``url`` into a :class:`URL`, normalising scheme aliases and local paths.

    >>> parse_url("gcs://bucket/a/b.bin")
    URL('gs://bucket/a/b.bin')
    >>> parse_url("s3://bucket").path
    ''
    """
    if isinstance(url, URL):
        return url
    if isinstance(url, str) and _REMOTE.match(url):
        return _parse_remote(url)
    return _parse(url)


def _parse(url: str | os.PathLike[str]) -> URL:
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str):
        raise ConfigError(f"a URL must be a string or a path, got {type(url).__name__}")
    raw = url
    if not url:
        raise ConfigError("a URL must not be empty", operation="parse")
    _check_key(url, raw)
    m = _SCHEME.match(url)
    if not m or _DRIVE.match(url):
        if "::" in url:
            raise ConfigError(
                "chained URLs ('a::b') are an fsspec spelling; mlstore APIs take the innermost URL",
                url=raw,
                operation="parse",
            )
        return URL("file", "", os.path.abspath(os.path.expanduser(url)))
    scheme = m.group(1).lower()
    protocol = SCHEMES.get(scheme)
    if protocol is None:
        supported = ", ".join(sorted(f"{s}://" for s in SCHEMES))
        raise ConfigError(
            f"unknown URL scheme {scheme!r}; supported schemes are {supported}",
            url=raw,
            operation="parse",
        )
    rest = url[m.end() :]
    if protocol == "file":
        # file:///abs, file://localhost/abs, file://~/x and file://relative/x. The path
        # is taken literally (no %-decoding), as fsspec does, so the URLs that ls()
        # returns always lead back to the same file.
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
        return URL("file", "", os.path.abspath(os.path.expanduser(rest)))
    if protocol == "memory":
        return URL("memory", "", _clean_key(rest.lstrip("/"), raw))
    if protocol in ("http", "https"):
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises on a malformed port
        except ValueError as exc:
            raise ConfigError(f"malformed URL ({exc})", url=raw, operation="parse") from None
        if not parts.hostname:
            raise ConfigError("an http(s) URL needs a host", url=raw, operation="parse")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return URL(protocol, parts.netloc, path)
    # bucketed: s3, gs, az, mlstore
    bucket, _, key = rest.partition("/")
    if protocol == "az" and "@" in bucket:
        # abfs://container@account.dfs.core.windows.net/path
        bucket = bucket.split("@", 1)[0]
    if not bucket:
        what = "mount name" if protocol == "mlstore" else "bucket"
        raise ConfigError(
            f"the URL has no {what}; expected {protocol}://<{what.replace(' ', '-')}>/<key>",
            url=raw,
            operation="parse",
        )
    if protocol != "mlstore" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}", bucket):
        raise ConfigError(
            f"{bucket!r} is not a valid bucket or container name", url=raw, operation="parse"
        )
    # Object keys are data: "dir//key" is an object of its own, never "dir/key".
    return URL(protocol, bucket, key)


def _clean_key(key: str, raw: str) -> str:
    """A ``memory://`` path: duplicate slashes collapsed, as fsspec's memory file system
    names its paths; a trailing slash (a "directory") kept."""
    trailing = key.endswith("/")
    parts = [p for p in key.split("/") if p not in ("",)]
    cleaned = "/".join(parts)
    if trailing and cleaned:
        cleaned += "/"
    return cleaned


# Decoding rounds a key's %-escapes get before a '..' is looked for: a proxy and then a
# server may each decode once (%252e -> %2e -> .). A key still encoded after that is
# refused: no real object name needs escapes nested this deep.
_DECODE_ROUNDS = 3


def _hidden_dotdot(path: str) -> bool:
    """Whether ``path`` holds a ``..`` segment once a server decodes it.

    Servers (and the proxies before them) decode ``%2e`` to ``.`` and ``%2f`` / ``%5c``
    to ``/`` / ``\\`` before they resolve a path, and many treat a backslash as a
    separator, so ``%2e%2e/``, ``.%2e/`` and ``..%2f`` climb out of a prefix as well as a
    plain ``../``, on any backend behind a mount.
    """
    seen = path
    for _ in range(_DECODE_ROUNDS + 1):
        if ".." in re.split(r"[/\\]", seen):
            return True
        decoded = unquote(seen)
        if decoded == seen:
            return False
        seen = decoded
    return True


def resolve_mount(url: URL, mounts: Mapping[str, Sequence[str | URL]]) -> list[URL]:
    """The physical URLs (replicas, primary first) behind an ``mlstore://`` URL.

    ``mounts`` maps names to replica prefixes, as strings or already parsed
    :class:`URL` objects (parsed once by a caller that resolves many URLs).
    """
    if url.protocol != "mlstore":
        return [url]
    prefixes = mounts.get(url.bucket)
    if prefixes is None:
        known = ", ".join(sorted(mounts)) or "none configured"
        raise ConfigError(
            f"unknown mount {url.bucket!r} (known mounts: {known}); configure it with "
            "Store(mounts={...}) or the [mounts] table of the config file",
            url=str(url),
            operation="resolve",
        )
    if ".." in url.path.split("/"):
        raise PermissionDeniedError(
            "a '..' segment would lead out of the mount", url=str(url), operation="resolve"
        )
    if _hidden_dotdot(url.path):
        raise PermissionDeniedError(
            "a '..' segment spelled with %-escapes or backslashes (%2e, %2f, %5c, \\) "
            "would lead out of the mount: servers decode them",
            url=str(url),
            operation="resolve",
        )
    out = []
    for prefix in prefixes:
        base = parse_url(prefix)
        if base.protocol == "mlstore":
            raise ConfigError(
                f"mount {url.bucket!r} points at another mount ({prefix}); mounts must name "
                "physical URLs",
                url=str(url),
                operation="resolve",
            )
        out.append(base.join(url.path) if url.path else base)
    return out


def safe_join(base: URL, rel: str) -> URL:
    """``base`` joined with the object key ``rel``, refusing keys that would escape
    ``base``: ``..`` segments, absolute paths, backslashes on local targets, NULs."""
    bad = None
    if "\x00" in rel:
        bad = "contains a NUL character"
    elif rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
        bad = "is an absolute path"
    else:
        parts = re.split(r"[\\/]" if base.protocol == "file" else "/", rel)
        if any(p == ".." for p in parts):
            bad = "contains a '..' segment"
    if bad is None and base.protocol == "file":
        joined = os.path.abspath(os.path.join(base.path, rel))
        if os.path.commonpath([joined, os.path.abspath(base.path)]) != os.path.abspath(base.path):
            bad = "would be written outside the destination"
    if bad is not None:
        raise PermissionDeniedError(
            f"refusing the key {rel!r}: it {bad}", url=str(base), operation="copy"
        )
    return base.join(rel)


def glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))
