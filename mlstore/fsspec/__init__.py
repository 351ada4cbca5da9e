"""``mlstore`` as an fsspec filesystem, so pandas, pyarrow, Dask, zarr and friends read
and write through a :class:`~mlstore.Store` unchanged.

Two spellings work with any fsspec consumer:

* **chained**: ``"mlstore::<url>"`` puts mlstore in front of another protocol::

      fsspec.open("mlstore::s3://bucket/key", mlstore={"retry": {...}}, s3={...})
      pd.read_parquet("mlstore::gs://bucket/table.parquet")

  fsspec hands the instance ``target_protocol`` (``s3``) and ``target_options`` (the
  ``s3={...}`` dict), which become ``Store(options={"s3": target_options})``. Bare paths
  on such an instance are paths of the target protocol, and the names it returns use the
  same form the target's own fsspec filesystem would (``/abs/path`` for local files,
  ``/a/b`` for memory, ``bucket/key`` for s3, gs and az, the full URL for http).

* **mounts**: ``"mlstore://<mount>/<key>"`` reads a mount of the Store::

      fs = fsspec.filesystem("mlstore", mounts={"imagenet": ["s3://bucket/imagenet"]})
      fs.open("mlstore://imagenet/train/0.jpg")

  Bare paths on an instance without ``target_protocol`` are ``<mount>/<key>``, and the
  names it returns have that form; ``ls("")`` lists the mounts.

Any full URL (``"memory://x/y"``, ``"file:///tmp/z"``) is accepted as is by every
instance; names below it come back as full URLs.

Keyword arguments other than ``target_protocol``, ``target_options`` and ``fo`` are
:class:`~mlstore.Store` keyword arguments (``cache``, ``retry``, ``http``, ``mounts``,
``options``, ``max_workers``, ``config``); each filesystem instance owns one Store. The
path fsspec passes as ``fo`` for a chained URL is not part of the instance: every chained
URL with the same Store arguments, target protocol and target options shares one
filesystem, and so one Store with its clients and caches.

Other consumers spell the same arguments differently (Hugging Face ``datasets``, for
one, nests a repeated hop and passes the ``mlstore`` hop's options as ``file={...}``);
:func:`mlstore.fsspec._arguments.canonical_arguments` brings each to this one form
before fsspec picks the instance.

Example:
    >>> import fsspec
    >>> with fsspec.open("mlstore::memory://fsspec-doc/a.txt", "w") as f:
    ...     _ = f.write("hello")
    >>> fs = fsspec.filesystem("mlstore", mounts={"doc": "memory://fsspec-doc"})
    >>> fs.cat_file("mlstore://doc/a.txt")
    b'hello'
    >>> fs.ls("doc", detail=False)
    ['doc/a.txt']
    >>> fs.rm("mlstore://doc", recursive=True)
"""

from __future__ import annotations

import datetime
import errno
import os
import re
from collections.abc import Mapping
from glob import has_magic
from hashlib import sha256
from typing import IO, Any, ClassVar

from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.implementations.chained import ChainedFileSystem
from fsspec.spec import make_instance

from mlstore._util.files import QuietReadFile, as_bytes
from mlstore.backends.base import ObjectInfo
from mlstore.errors import ConfigError, IsADirectoryError_, NotFoundError
from mlstore.fsspec._arguments import (
    _FSSPEC_KWARGS,
    _STORE_KWARGS,
    _AppendUnsupported,
    _OneSpelling,
    _without_secrets,
)
from mlstore.store import Store
from mlstore.url import SCHEMES, URL, parse_url

__all__ = ["MLStoreFileSystem"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class MLStoreFileSystem(ChainedFileSystem, metaclass=_OneSpelling):  # type: ignore[misc]
    """An fsspec filesystem whose every operation goes through one :class:`~mlstore.Store`.

    Args:
        target_protocol: set by fsspec for ``"mlstore::<protocol>://..."``: bare paths
            are paths of this protocol.
        target_options: set by fsspec from the ``<protocol>={...}`` keyword: the
            backend options of ``target_protocol``.
        fo: the path fsspec resolved for the chained URL (unused, and left out of the
            instance's identity).
        **store_kwargs: keyword arguments of :class:`~mlstore.Store`.
    """

    protocol: ClassVar[str] = "mlstore"
    root_marker = ""
    #: fsspec passes the chained URL's path as ``fo``. An instance does not depend on it,
    #: so it stays out of the instance-cache token (and of ``storage_options``, hence of
    #: pickles and JSON, which rebuild the same instance): otherwise every path would build
    #: and keep its own filesystem and Store. fsspec's own chained caches do the same.
    _strip_tokenize_options: ClassVar[tuple[str, ...]] = ("fo",)

    def __init__(
        self,
        target_protocol: str | None = None,
        target_options: Mapping[str, Any] | None = None,
        fo: str | None = None,
        **store_kwargs: Any,
    ) -> None:
        fsspec_kwargs = {k: store_kwargs.pop(k) for k in list(store_kwargs) if k in _FSSPEC_KWARGS}
        super().__init__(**fsspec_kwargs)
        unknown = sorted(set(store_kwargs) - _STORE_KWARGS)
        if unknown:
            raise ConfigError(
                f"unknown mlstore filesystem option(s) {unknown}; accepted are "
                f"target_protocol, target_options, fo and the Store arguments "
                f"{sorted(_STORE_KWARGS)}"
            )
        self.target_protocol: str | None = None
        if target_protocol is not None:
            canonical = SCHEMES.get(str(target_protocol).lower())
            if canonical is None or canonical == "mlstore":
                supported = ", ".join(sorted(s for s in SCHEMES if s != "mlstore"))
                raise ConfigError(
                    f"mlstore cannot chain to {target_protocol!r}; supported target "
                    f"protocols are {supported}"
                )
            self.target_protocol = canonical
            # The schemes it serves, as other fsspec filesystems say theirs: Ray Data and
            # pyarrow check a path's scheme against them before they hand the path over.
            aliases = sorted(s for s, c in SCHEMES.items() if c == canonical)
            self.protocol = ("mlstore", *aliases)  # type: ignore[misc, assignment]
        if target_options:
            if self.target_protocol is None:
                raise ConfigError("target_options needs a target_protocol")
            proto = self.target_protocol
            options = {k: dict(v) for k, v in (store_kwargs.get("options") or {}).items()}
            options[proto] = {**options.get(proto, {}), **dict(target_options)}
            store_kwargs["options"] = options
        self.store = Store(**store_kwargs)

    def __repr__(self) -> str:
        target = f"target_protocol={self.target_protocol!r}, " if self.target_protocol else ""
        return f"MLStoreFileSystem({target}store={self.store!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Like fsspec's own pickling (rebuild from the constructor arguments), minus the
        # options that look like credentials: the copy re-resolves those from its
        # environment, config file or credential provider, as a pickled Store does.
        return make_instance, (
            type(self),
            self.storage_args,
            _without_secrets(self.storage_options),
        )

    def to_dict(self, *, include_password: bool = True) -> dict[str, Any]:
        """fsspec's JSON-ready description of this filesystem, minus every credential
        option (``to_json`` is built from it).

        ``include_password`` is accepted for fsspec's sake and makes no difference: a
        description is written to files, logs and task graphs, so it never carries a
        secret, as the pickle does not. :meth:`from_dict` gives a filesystem that
        re-resolves credentials from its environment, config file or credential provider.
        """
        from fsspec.json import FilesystemJSONEncoder

        encoder = FilesystemJSONEncoder()
        cls = type(self)
        described: dict[str, Any] = dict(
            cls=f"{cls.__module__}:{cls.__name__}",
            protocol=cls.protocol,
            args=encoder.make_serializable(self.storage_args),
            **encoder.make_serializable(_without_secrets(self.storage_options)),
        )
        return described

    # ------------------------------------------------------------------ paths

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        if path is None:  # fsspec's DirFileSystem asks for the root this way
            return ""
        path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        if path.startswith("mlstore::"):
            path = path[len("mlstore::") :]
        if path.startswith("mlstore://"):
            path = path[len("mlstore://") :]
        m = _URL.match(path)
        if m:
            rest = path[m.end() :]
            stripped = rest.rstrip("/")
            if not stripped and rest:
                stripped = "/"  # file:/// is the root, not the current directory
            return path[: m.end()] + stripped
        if path and not path.strip("/"):
            return "/"
        return path.rstrip("/")

    @classmethod
    def _parent(cls, path: Any) -> str:
        path = cls._strip_protocol(path)
        m = _URL.match(path)
        scheme, rest = (path[: m.end()], path[m.end() :]) if m else ("", path)
        lead = "/" if rest.startswith("/") else ""
        body = rest.strip("/")
        parent = body.rsplit("/", 1)[0] if "/" in body else ""
        return scheme + lead + parent

    def unstrip_protocol(self, name: str) -> str:
        """The URL of ``name`` that fsspec can open again: ``mlstore://<mount>/<key>``
        for mounts, ``mlstore::<url>`` otherwise."""
        if _URL.match(name) or self.target_protocol is not None:
            return "mlstore::" + str(self._url(name))
        return "mlstore://" + name.lstrip("/")

    def _url(self, path: Any) -> URL:
        """The Store URL of a path of this instance."""
        p: str = self._strip_protocol(path)
        if _URL.match(p):
            return parse_url(p)
        target = self.target_protocol
        if target is None:
            key = p.strip("/")
            if not key:
                raise ConfigError(
                    "the mlstore root lists the mounts; name a mount to read or write",
                    url="mlstore://",
                )
            return parse_url("mlstore://" + key)
        if target == "file":
            return URL("file", "", os.path.abspath(os.path.expanduser(p or ".")))
        if target in ("memory", "http", "https"):
            return parse_url(f"{target}://{p.lstrip('/') if target == 'memory' else p}")
        return parse_url(f"{target}://{p.lstrip('/')}")

    def _is_root(self, path: Any) -> bool:
        """Whether ``path`` is the root of a mounts-only instance (the list of mounts)."""
        if self.target_protocol is not None:
            return False
        p: str = self._strip_protocol(path)
        return not _URL.match(p) and not p.strip("/")

    def _name(self, url: URL) -> str:
        """``url`` in this instance's path form (what ``ls``/``info`` return)."""
        target = self.target_protocol
        if url.protocol == "mlstore" and target is None:
            return f"{url.bucket}/{url.path}".strip("/")
        if url.protocol == target:
            if target == "file":
                return url.path
            if target == "memory":
                key = url.path.strip("/")
                return "/" + key if key else ""
            if target in ("http", "https"):
                return str(url)
            return f"{url.bucket}/{url.path}".rstrip("/")
        return self._strip_protocol(str(url))  # type: ignore[no-any-return]

    def _info_dict(self, info: ObjectInfo, name: str | None = None) -> dict[str, Any]:
        out = info.as_dict()
        out["name"] = self._name(info.url) if name is None else name
        return out

    def _mount_dirs(self) -> list[dict[str, Any]]:
        return [
            {"name": m, "size": 0, "type": "directory"} for m in sorted(self.store.config.mounts)
        ]

    # ------------------------------------------------------------------ reading

    def ls(self, path: Any, detail: bool = True, **kwargs: Any) -> list[Any]:
        if self._is_root(path):
            entries = self._mount_dirs()
        else:
            url = self._url(path)
            try:
                found: list[ObjectInfo] = self.store.ls(url, detail=True)
            except NotFoundError:
                if not self._is_mount_root(url):
                    raise
                found = []
            entries = [self._info_dict(e) for e in found]
        return entries if detail else [e["name"] for e in entries]

    def _is_mount_root(self, url: URL) -> bool:
        """A configured mount with nothing below it yet is still an (empty) directory."""
        return url.protocol == "mlstore" and not url.path and url.bucket in self.store.config.mounts

    def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
        if self._is_root(path):
            return {"name": "", "size": 0, "type": "directory"}
        url = self._url(path)
        try:
            found = self.store.info(url)
        except NotFoundError:
            if not self._is_mount_root(url):
                raise
            return {"name": self._name(url), "size": 0, "type": "directory"}
        return self._info_dict(found, self._name(url))

    def find(
        self,
        path: Any,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        if maxdepth is not None or withdirs or detail or self._is_root(path):
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        # Files only: one recursive listing in the Store (a single paged listing on
        # object stores) instead of one ls() per directory.
        try:
            urls = self.store.find(self._url(path))
        except NotFoundError:
            return []
        return sorted(self._name(parse_url(u)) for u in urls)

    def cat_file(
        self, path: Any, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        return self.store.read_bytes(self._url(path), start, end)

    def _open(
        self,
        path: Any,
        mode: str = "rb",
        block_size: Any = None,
        autocommit: bool = True,
        cache_options: Any = None,
        **kwargs: Any,
    ) -> IO[bytes] | QuietReadFile:
        if not autocommit:
            raise NotImplementedError(
                "mlstore writes are atomic per file; fsspec transactions are not supported"
            )
        url = self._url(path)
        if mode == "rb":
            buffer_size = block_size if isinstance(block_size, int) and block_size > 0 else None
            fh: IO[bytes] = self.store.open(
                url, "rb", buffer_size=buffer_size, version=kwargs.get("version")
            )
            # fsspec's block caches fetch this many bytes at a time: the Store's own cache
            # block, unless the caller asked for a size.
            blocksize = buffer_size or self.store.config.cache.block_size
            return QuietReadFile(fh, path=path, fs=self, blocksize=blocksize)
        if "a" in mode:
            raise _AppendUnsupported(
                "append mode is not supported: mlstore replaces an object as a whole "
                "(read it, then write it anew with 'wb')",
                url=str(url),
                operation="open",
            )
        if mode == "xb":
            if self.store.exists(url):
                raise FileExistsError(errno.EEXIST, "the object already exists", str(url))
            mode = "wb"
        return self.store.open(url, mode)

    def ukey(self, path: Any) -> str:
        """A token that changes when the object changes: its version (ETag,
        generation, ``mtime_ns-size``) where the backend reports one."""
        url = self._url(path)
        found = self.store.info(url)
        basis = f"{url}@{found.version}" if found.version else str(found.as_dict())
        return sha256(basis.encode()).hexdigest()

    def modified(self, path: Any) -> datetime.datetime:
        mtime = self.info(path).get("mtime")
        if mtime is None:
            raise NotImplementedError(f"the backend reports no modification time for {path}")
        return datetime.datetime.fromtimestamp(mtime, tz=datetime.timezone.utc)

    # ------------------------------------------------------------------ writing

    def pipe_file(self, path: Any, value: Any, mode: str = "overwrite", **kwargs: Any) -> None:
        url = self._url(path)
        if mode == "create":
            # Store.write_bytes refuses a value that is not bytes-like before any request;
            # check it here too, so that refusal also comes before the existence check.
            value = as_bytes(value, "pipe_file", url)
            if self.store.exists(url):
                raise FileExistsError(errno.EEXIST, "the object already exists", str(url))
        self.store.write_bytes(url, value)

    def put_file(
        self,
        lpath: Any,
        rpath: Any,
        callback: Any = DEFAULT_CALLBACK,
        mode: str = "overwrite",
        **kwargs: Any,
    ) -> None:
        if mode == "create" and self.exists(rpath):
            raise FileExistsError(errno.EEXIST, "the object already exists", str(rpath))
        local = os.path.abspath(os.fspath(lpath))
        if os.path.isdir(local):
            self.makedirs(rpath, exist_ok=True)
            return
        callback.set_size(os.path.getsize(local))
        self.store.copy(
            URL("file", "", local),
            self._url(rpath),
            progress=lambda done, _total: callback.absolute_update(done),
        )

    def cp_file(self, path1: Any, path2: Any, **kwargs: Any) -> None:
        src = self._url(path1)
        if self.store.info(src).is_dir:
            self.makedirs(path2, exist_ok=True)
            return
        self.store.copy(src, self._url(path2))

    def mkdir(self, path: Any, create_parents: bool = True, **kwargs: Any) -> None:
        if self._is_root(path):
            raise FileExistsError(errno.EEXIST, "the mlstore root always exists", "")
        if self.exists(path):
            raise FileExistsError(errno.EEXIST, "already exists", str(self._url(path)))
        if not create_parents and self._has_directories(self._url(path)):
            parent = self._parent(path)
            if parent and not self.isdir(parent):
                raise FileNotFoundError(
                    errno.ENOENT, "the parent directory does not exist", str(self._url(parent))
                )
        self.store.mkdir(self._url(path))

    def _has_directories(self, url: URL) -> bool:
        """Whether ``url`` lives on storage with real directories (object stores have
        none: a "directory" exists while something is below it)."""
        return self.store.resolve(url)[0].protocol in ("file", "memory")

    def makedirs(self, path: Any, exist_ok: bool = False) -> None:
        if self._is_root(path):
            if not exist_ok:
                raise FileExistsError(errno.EEXIST, "the mlstore root always exists", "")
            return
        try:
            existing = self.info(path)
        except FileNotFoundError:
            self.store.mkdir(self._url(path))
            return
        if not exist_ok or existing["type"] != "directory":
            raise FileExistsError(errno.EEXIST, "already exists", str(self._url(path)))

    def rmdir(self, path: Any) -> None:
        if self._is_root(path):
            raise PermissionError(errno.EPERM, "the mlstore root cannot be removed", "")
        url = self._url(path)
        if not self.store.info(url).is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(url))
        if self.store.ls(url):
            raise OSError(errno.ENOTEMPTY, "directory not empty", str(url))
        self.store.rm(url, recursive=True)

    def rm_file(self, path: Any) -> None:
        self.store.rm(self._url(path))

    def _rm(self, path: Any) -> None:
        self.rm_file(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        if isinstance(path, (str, os.PathLike)) and maxdepth is None:
            p = self._strip_protocol(path)
            if not has_magic(p):
                self._rm_one(p, recursive)
                return
        # Lists, globs and depth limits: expand like fsspec, deepest paths first.
        paths = self.expand_path(path, recursive=recursive, maxdepth=maxdepth)
        existed = {p for p in paths if self.exists(p)}
        for p in reversed(paths):
            try:
                self._rm_one(p, recursive=False)
            except FileNotFoundError:
                # A directory of an object store exists only while something is below
                # it: deleting its files earlier in this loop made it vanish.
                if p not in existed:
                    raise

    def _rm_one(self, path: str, recursive: bool) -> None:
        if self._is_root(path):
            raise PermissionError(errno.EPERM, "the mlstore root cannot be removed", "")
        url = self._url(path)
        if recursive:
            self.store.rm(url, recursive=True)
        elif self.store.info(url).is_dir:
            if self.store.ls(url):
                raise IsADirectoryError_(
                    "this directory is not empty; pass recursive=True to delete everything "
                    "below it",
                    url=str(url),
                    operation="rm",
                )
            self.store.rm(url, recursive=True)
        else:
            self.store.rm(url)
