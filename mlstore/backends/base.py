"""The contract every storage backend keeps, and the lazy registry of backends.

A backend turns mlstore's small set of operations into calls on one kind of storage.
It knows nothing of caching, retries or the Store: it raises
:mod:`mlstore.errors` exceptions (translated from its SDK's in exactly one place,
``_translate``) and reports object versions so reads can be pinned.

Backends are registered as ``"module:Class"`` strings and imported on first use, so
``import mlstore`` loads no cloud SDK.
"""

from __future__ import annotations

import abc
import importlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, ClassVar

from mlstore._util.process import PerProcess
from mlstore.backends._hedge import Hedge
from mlstore.config import StoreConfig
from mlstore.errors import (
    ConfigError,
    IsADirectoryError_,
    MlstoreError,
    NotFoundError,
    PermissionDeniedError,
    UnsupportedOperation,
)
from mlstore.url import URL

__all__ = [
    "Backend",
    "Hedge",
    "InterruptedBodyError",
    "ObjectInfo",
    "PerProcess",
    "Received",
    "Upload",
    "find_cause",
    "get_backend_class",
    "keep_received",
    "register_backend",
    "translate_os_error",
]


@dataclass(frozen=True)
class ObjectInfo:
    """What a backend knows about one object or directory.

    Attributes:
        url: the object's canonical URL.
        size: length in bytes (0 for directories).
        type: ``"file"`` or ``"directory"``.
        version: an opaque token that changes whenever the content changes (S3 ETag
            or VersionId, GCS generation, Azure ETag, local ``mtime_ns-size``, HTTP
            strong ETag), or ``None`` if the backend cannot tell.
        mtime: last modification as a POSIX timestamp, if known.
        checksums: server-side checksums by algorithm (``{"md5": "..."}``).
        content_hash: mlstore's own xxh3-128 of the content, if recorded.
        block_digests: mlstore's per-block digests of the content, if recorded (see
            :class:`~mlstore.hashing.BlockDigests`): blocks fetched by ranged reads are
            checked against them before they are cached.
    """

    url: URL
    size: int
    type: str = "file"
    version: str | None = None
    mtime: float | None = None
    checksums: Mapping[str, str] = field(default_factory=dict)
    content_hash: str | None = None
    block_digests: str | None = field(default=None, repr=False)

    @property
    def is_dir(self) -> bool:
        return self.type == "directory"

    def as_dict(self) -> dict[str, Any]:
        """The fsspec-style ``info`` dict (``name``, ``size``, ``type`` and more)."""
        out: dict[str, Any] = {"name": str(self.url), "size": self.size, "type": self.type}
        if self.version is not None:
            out["version"] = self.version
        if self.mtime is not None:
            out["mtime"] = self.mtime
        if self.checksums:
            out["checksums"] = dict(self.checksums)
        if self.content_hash:
            out["content_hash"] = self.content_hash
        return out


class InterruptedBodyError(Exception):
    """Raised inside a backend when a response body stops early (a reset, a timeout, a
    short body): it carries what did arrive, so the Store can resume from there with a
    range request pinned to ``version`` instead of downloading it all again.

    Args:
        received: the bytes that arrived, from the start of the requested range.
        version: the version the response belonged to (ETag, generation), or ``None``
            (then the read cannot be resumed safely and starts over).
        length: how many bytes the response announced, if it did.
    """

    def __init__(self, received: bytes, version: str | None, length: int | None) -> None:
        super().__init__(f"the body stopped after {len(received)} bytes")
        self.received = received
        self.version = version
        self.length = length


def find_cause(exc: BaseException | None, *types: type[BaseException]) -> BaseException | None:
    """The first exception of ``types`` in ``exc``'s cause/context chain, or ``None``.

    SDKs wrap transport errors in their own types; this finds the original.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@dataclass
class Received:
    """What a read delivered before its body broke off.

    A caller that can resume passes an empty one as ``received=`` to
    :meth:`Backend.read` or :meth:`Backend.fetch` of a backend whose
    :attr:`Backend.resumable` is true. When the body stops early (a reset, a stall, a
    short body) and the error raised is transient, the backend fills it in before
    raising: the caller then asks only for the rest, pinned to ``version``.

    Attributes:
        data: the bytes that arrived, from the start of the requested range.
        version: the version those bytes belong to (ETag, generation), or ``None``
            (then nothing can be pinned, and the read starts over).
        length: how many bytes the response announced, if it did.
    """

    data: bytes = b""
    version: str | None = None
    length: int | None = None


def keep_received(
    received: Received | None, error: MlstoreError, cause: BaseException
) -> MlstoreError:
    """Fill ``received`` with what an interrupted body (an :class:`InterruptedBodyError`
    in ``cause``'s chain) delivered, when ``error`` is worth resuming; returns ``error``.

    Bytes that failed a check (an :class:`~mlstore.errors.IntegrityError`) are not a
    start to build on, and neither is a permanent error.
    """
    from mlstore.errors import IntegrityError, TransientError

    if received is None or not isinstance(error, TransientError):
        return error
    if isinstance(error, IntegrityError):
        return error
    found = find_cause(cause, InterruptedBodyError)
    if isinstance(found, InterruptedBodyError):
        received.data, received.version, received.length = (
            found.received,
            found.version,
            found.length,
        )
    return error


def translate_os_error(exc: OSError, url: URL, operation: str) -> MlstoreError:
    """Map a builtin ``OSError`` raised for ``url`` to the mlstore error of that meaning."""
    text = str(url)
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, MlstoreError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return NotFoundError("no such object or directory", url=text, operation=operation)
    if isinstance(exc, PermissionError):
        return PermissionDeniedError(f"permission denied ({reason})", url=text, operation=operation)
    if isinstance(exc, IsADirectoryError):
        return IsADirectoryError_.at(text, operation)
    if isinstance(exc, NotADirectoryError):
        return ConfigError(
            "a parent of this path is a file, not a directory", url=text, operation=operation
        )
    if isinstance(exc, FileExistsError):
        return ConfigError("something already exists at this path", url=text, operation=operation)
    return MlstoreError(f"{type(exc).__name__}: {reason}", url=text, operation=operation)


class Upload(abc.ABC):
    """One multipart upload in progress: an object sent in numbered parts, one request
    each, that no reader sees until :meth:`complete` publishes it whole.

    The engine drives it (see :mod:`mlstore._engine.multipart`): it sends parts from a
    few threads at once, each :meth:`put_part` as one retried call, so a part must be
    safe to send again (the same number with the same bytes replaces the first copy).
    Then it calls :meth:`complete` once, or :meth:`abort` after any failure. Like the
    backend that made it, an upload retries nothing and raises mlstore errors naming
    its URL.

    Attributes:
        url: the object the upload replaces.
    """

    url: URL

    @abc.abstractmethod
    def put_part(self, number: int, data: bytes | bytearray | memoryview) -> str:
        """Send part ``number`` (from 1, in the object's order); returns the token
        :meth:`complete` needs for it. Every part but the last is at least the
        smallest part the store accepts (5 MiB on S3)."""

    @abc.abstractmethod
    def complete(self, parts: Sequence[str], *, content_hash: str) -> str | None:
        """Publish the parts (their tokens, in order) as the object, atomically; the
        version made, if the answer names it. ``content_hash`` is mlstore's hash of the
        whole, recorded in the object's metadata where the store takes metadata at this
        point (it replaces nothing given to :meth:`Backend.start_upload`)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the parts sent so far; the object at :attr:`url` is left as it was."""


class Backend(abc.ABC):
    """One kind of storage, reached through one client per process.

    Subclasses set :attr:`protocol` and implement the abstract methods. ``url``
    arguments are :class:`~mlstore.url.URL` objects already parsed and resolved by
    the Store. ``start``/``end`` follow Python slicing: ``end`` is exclusive and
    either may be ``None``.
    """

    protocol: ClassVar[str]
    #: Backends that cannot write (http) say so; the Store raises UnsupportedOperation.
    read_only: ClassVar[bool] = False
    #: Backends whose ``read``/``fetch`` take ``received=`` (see :class:`Received`), so
    #: an interrupted body is resumed instead of fetched again.
    resumable: ClassVar[bool] = False
    #: Backends that can send a second copy of a slow read (s3) take ``hedge=`` when
    #: they are built (``RetryPolicy.hedge_after``).
    hedges: ClassVar[bool] = False
    #: Backends whose :meth:`open_write` collects the bytes and stores them with one
    #: :meth:`write` at close (the Store then retries that write as a whole); backends
    #: that stream (local files) leave it False.
    buffered_writes: ClassVar[bool] = False
    #: Backends that can send one object in parts (:meth:`start_upload`): large writes
    #: then go up part by part, never held whole in memory. Others keep whole writes.
    supports_multipart: ClassVar[bool] = False
    #: The most parts one upload may have (S3: 10,000).
    max_parts: ClassVar[int] = 10_000
    #: Environment variables that decide which endpoint, account or credentials this
    #: backend uses: part of the identity of what it reads (see the node cache's keys).
    identity_env: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, options: Mapping[str, Any], config: StoreConfig, *, hedge: Hedge | None = None
    ) -> None:
        self.options = dict(options)
        self.config = config
        #: When to send a second copy of a slow read, or ``None`` (never).
        self.hedge = hedge
        # Credentials given to (or found for) a backend are masked in all log output,
        # including the SDKs' own DEBUG logs.
        from mlstore._util import redact as _redact

        _redact.register_options(self.options)
        _redact.register_environment()

    def __repr__(self) -> str:
        # Options may hold credentials: show only their names.
        return f"{type(self).__name__}(options={sorted(self.options)})"

    # ---- reading
    @abc.abstractmethod
    def info(self, url: URL) -> ObjectInfo:
        """Metadata of ``url``; :class:`NotFoundError` if absent."""

    @abc.abstractmethod
    def read(
        self,
        url: URL,
        start: int | None = None,
        end: int | None = None,
        version: str | None = None,
        *,
        received: Received | None = None,
    ) -> bytes:
        """Bytes ``[start:end)`` of ``url``; if ``version`` is given and the object is no
        longer that version, :class:`~mlstore.errors.PreconditionFailedError`.
        ``received`` is filled in when the body breaks off (:class:`Received`)."""

    def fetch(self, url: URL, *, received: Received | None = None) -> tuple[bytes, str | None]:
        """The whole object and the version those bytes are, consistently.

        The default asks for the version, then reads pinned to it (two requests);
        backends whose GET answer carries the version override it with one request.
        """
        try:
            info = self.info(url)
        except MlstoreError as exc:
            exc.operation = "read"  # the caller asked to read; say so
            raise
        if info.is_dir:
            raise IsADirectoryError_.at(url, "read")
        if received is None:  # a backend that does not resume may not take the keyword
            return self.read(url, version=info.version), info.version
        return self.read(url, version=info.version, received=received), info.version

    def check_resumed(self, url: URL, data: bytes, version: str | None) -> None:
        """Check ``data``, the whole object at ``url`` as of ``version`` put together
        from an interrupted body (:class:`Received`) and a ranged read of the rest, as
        one uninterrupted download would have been checked; raise
        :class:`~mlstore.errors.CorruptBodyError` if it fails. The default checks
        nothing (a backend that is not :attr:`resumable` never puts one together)."""

    def open_read(self, url: URL, info: ObjectInfo) -> IO[bytes] | None:
        """A native seekable file for ``url`` when the backend has a faster one than
        ranged reads (local files), else ``None``."""
        return None

    @abc.abstractmethod
    def ls(self, url: URL) -> list[ObjectInfo]:
        """Entries directly below ``url``; a file lists itself."""

    @abc.abstractmethod
    def find(self, url: URL) -> Iterator[ObjectInfo]:
        """Every file below ``url``, recursively."""

    def exists(self, url: URL) -> bool:
        try:
            self.info(url)
        except NotFoundError:
            return False
        return True

    # ---- writing
    def write(self, url: URL, data: bytes) -> str | None:
        """Replace ``url`` with ``data`` atomically: readers see the old or new bytes.

        Returns the version the store made of ``data`` when it names one in its answer
        (an ETag), else ``None``: the node cache then knows which version holds the
        bytes it hashed, without asking."""
        with self.open_write(url) as fh:
            fh.write(data)
        return None

    def open_write(self, url: URL) -> IO[bytes]:
        """A binary file whose content replaces ``url`` atomically on ``close()``; if the
        ``with`` block raises, nothing is written."""
        raise UnsupportedOperation(
            f"the {self.protocol} backend is read-only", url=str(url), operation="write"
        )

    def start_upload(
        self, url: URL, *, content_hash: str | None = None, block_digests: str | None = None
    ) -> Upload:
        """Begin a multipart upload that will replace ``url`` (see :class:`Upload`), on a
        backend whose :attr:`supports_multipart` is true. ``content_hash`` and
        ``block_digests`` describe the whole content when it is known before the first
        part (a write of one buffer), and are then recorded with the object."""
        raise UnsupportedOperation(
            f"the {self.protocol} backend cannot upload in parts", url=str(url), operation="write"
        )

    def rm(self, url: URL, recursive: bool = False) -> None:
        raise UnsupportedOperation(
            f"the {self.protocol} backend is read-only", url=str(url), operation="rm"
        )

    def mkdir(self, url: URL) -> None:
        """Create a directory (and its parents). Object stores have no directories, so
        the default does nothing."""

    def copy(self, src: URL, dst: URL) -> None:
        """Copy within this backend (server side where the storage can)."""
        self.write(dst, self.read(src))

    def close(self) -> None:
        """Release clients and connections."""


# ------------------------------------------------------------------------ registry

_REGISTRY: dict[str, str | type[Backend]] = {
    "file": "mlstore.backends.local:LocalBackend",
    "memory": "mlstore.backends.memory:MemoryBackend",
    "http": "mlstore.backends.http:HttpBackend",
    "https": "mlstore.backends.http:HttpBackend",
    "s3": "mlstore.backends.s3:S3Backend",
    "gs": "mlstore.backends.gcs:GCSBackend",
    "az": "mlstore.backends.azure:AzureBackend",
}
#: The backends of another transport (:attr:`~mlstore.config.StoreConfig.transport`), by
#: transport and protocol; a protocol not listed keeps its backend under every transport.
_TRANSPORTS: dict[str, dict[str, str | type[Backend]]] = {
    "obstore": {
        "s3": "mlstore.backends.fast:FastS3Backend",
        "gs": "mlstore.backends.fast:FastGCSBackend",
        "az": "mlstore.backends.fast:FastAzureBackend",
    },
}
_INSTALL_HINT: dict[str, str] = {
    "s3": "install it with: pip install 'mlstore[s3]'",
    "gs": "install it with: pip install 'mlstore[gcs]'",
    "az": "install it with: pip install 'mlstore[azure]'",
}
#: Protocols whose backend the user registered: kept under every transport.
_REPLACED: set[str] = set()
_lock = threading.RLock()


def register_backend(
    protocol: str, target: str | type[Backend], *, install_hint: str | None = None
) -> None:
    """Register (or replace) the backend of ``protocol``: a class or a lazy
    ``"module:Class"`` string. It then serves ``protocol`` under every transport."""
    with _lock:
        _REGISTRY[protocol] = target
        _REPLACED.add(protocol)
        if install_hint:
            _INSTALL_HINT[protocol] = install_hint


def install_hint(protocol: str) -> str:
    """What to install for ``protocol``'s backend to work."""
    return _INSTALL_HINT.get(protocol, f"install the package the {protocol} backend needs")


def get_backend_class(protocol: str, transport: str = "fsspec") -> type[Backend]:
    """The backend class of ``protocol``, imported on first use; under another
    ``transport`` (``"obstore"``), that transport's class where it has one."""
    with _lock:
        table = _TRANSPORTS.get(transport, {})
        if protocol in table and protocol not in _REPLACED:
            return _load(table, protocol, transport)
        if protocol not in _REGISTRY:
            raise ConfigError(
                f"no backend is registered for {protocol!r}; registered: {sorted(_REGISTRY)}"
            )
        return _load(_REGISTRY, protocol, "fsspec")


def _load(table: dict[str, Any], protocol: str, transport: str) -> type[Backend]:
    """``table[protocol]``, imported if it is still a ``"module:Class"`` string (then
    kept as the class). Called with ``_lock`` held."""
    target = table[protocol]
    if not isinstance(target, str):
        return target  # type: ignore[no-any-return]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = _INSTALL_HINT.get(protocol, "")
        if transport != "fsspec":
            hint = f"{hint} and pip install 'mlstore[fast]'" if hint else ""
        raise ConfigError(
            f"the {protocol} backend needs a package that is not installed "
            f"({exc.name}){'; ' + hint if hint else ''}"
        ) from None
    cls: type[Backend] = getattr(module, attr)
    table[protocol] = cls
    return cls
