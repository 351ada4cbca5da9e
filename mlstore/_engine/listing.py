"""Listings: ``ls``, ``find`` and ``glob``, with names expressed in the namespace the
caller used (a listing of ``mlstore://mount/dir`` names ``mlstore://mount/dir/x``, from
whichever replica answered)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from mlstore._engine.calls import Calls
from mlstore._engine.replicas import Replicas, Resolved
from mlstore.backends.base import Backend, ObjectInfo
from mlstore.errors import NotFoundError
from mlstore.url import URL, glob_regex, parse_url

__all__ = ["Listing", "logical"]

_WILDCARD = re.compile(r"[*?\[]")


def logical(where: Resolved, entry: ObjectInfo) -> ObjectInfo:
    """A physical listing entry, named in the mount namespace the caller used."""
    asked = where.url
    if asked.protocol != "mlstore":
        return entry
    name = str(entry.url)
    rel = entry.url.name
    for physical in where.replicas:  # the entry may come from any replica
        base = str(physical).rstrip("/")
        if name == base or name.startswith(base + "/"):
            rel = name[len(base) :].lstrip("/")
            break
    return dataclasses.replace(entry, url=asked.join(rel) if rel else asked)


class Listing:
    """Directory listings on the replica that answers.

    Args:
        calls: this process's backends and the retried call.
        replicas: the failover sweep.
        resolve: resolves a URL built here (the literal head of a glob pattern).
        exists: whether a resolved URL names an object or directory.
    """

    def __init__(
        self,
        calls: Calls,
        replicas: Replicas,
        resolve: Callable[[URL], Resolved],
        exists: Callable[[Resolved], bool],
    ) -> None:
        self.calls = calls
        self.replicas = replicas
        self.resolve = resolve
        self.exists = exists

    def ls(self, where: Resolved) -> list[ObjectInfo]:
        """Entries directly below ``where``, as the storage names them (uncached)."""
        call = self.calls.call

        def ls(target: URL, backend: Backend) -> list[ObjectInfo]:
            return call(backend, lambda: backend.ls(target), target, op="list")

        return self.replicas.run(where, ls)

    def find(self, where: Resolved) -> list[ObjectInfo]:
        """Every file below ``where``, recursively, as the storage names them."""
        call = self.calls.call

        def find(target: URL, backend: Backend) -> list[ObjectInfo]:
            return call(backend, lambda: list(backend.find(target)), target, op="list")

        return self.replicas.run(where, find)

    def find_urls(self, where: Resolved) -> list[str]:
        """Every file below ``where``, as sorted URLs in the caller's namespace."""
        return sorted(str(logical(where, e).url) for e in self.find(where))

    def glob(self, pattern: URL) -> list[str]:
        """URLs matching ``pattern``: ``*`` and ``?`` stay within one path segment,
        ``**`` spans any number of them, ``[abc]`` is a character class."""
        path = pattern.path
        # Split at the first segment holding a wildcard: list below the literal part.
        m = _WILDCARD.search(path)
        if m is None:
            return [str(pattern)] if self.exists(self.resolve(pattern)) else []
        head = path[: m.start()]
        root = head[: head.rfind("/") + 1] if "/" in head else ""
        base = URL(pattern.protocol, pattern.bucket, root.rstrip("/") or root)
        regex = glob_regex(path)
        try:
            files = self.find_urls(self.resolve(base))
        except NotFoundError:
            return []
        candidates: set[str] = set()
        # "memory://" and "file:///" already end in a slash; "s3://bucket" does not
        prefix = str(base) if str(base).endswith("/") else str(base) + "/"
        for f in files:
            candidates.add(f)
            # the directories between the base and each file
            parts = f[len(prefix) :].split("/")
            for i in range(1, len(parts)):
                candidates.add(prefix + "/".join(parts[:i]))
        return sorted(c for c in candidates if regex.fullmatch(parse_url(c).path))
