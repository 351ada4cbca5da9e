"""``gs://``: Google Cloud Storage, through gcsfs (``pip install mlstore[gcs]``).

Object reads, metadata reads and whole-object writes are single JSON/media API requests
that mlstore builds itself: a read pinned to a version asks for exactly that object
generation (``generation=N``), and a write records mlstore's content hash in the
object's metadata. A large write goes up in parts composed into the object at the end
(see :class:`GCSUpload`). Listing, deletion, server-side copy (``rewriteTo``) and bucket
creation use gcsfs. Every request makes one attempt: gcsfs's retry loops (the
``retry_request`` decorator, batch-delete resubmission) are replaced by single-attempt
versions, so the one retry layer is mlstore's own.

mlstore uses gcsfs's core ``GCSFileSystem`` (the JSON API over HTTP), not the
experimental gRPC-based filesystem gcsfs 2025.x+ selects by default, whose bucket-type
probes carry their own retry policy.

Options (``Store(options={"gs": {...}})``): ``endpoint_url``, ``project``, ``token``
(``"anon"``, ``"google_default"``, ``"cloud"``, a service-account file path, a
credentials dict or object), ``anon`` (``True`` for anonymous access; unlike ``token``
it is not a secret, so it reaches spawned workers), ``requester_pays``, ``access``,
``session_kwargs``, and any other ``gcsfs.GCSFileSystem`` argument. Credentials otherwise
come from Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, the
gcloud login, the metadata server). ``MLSTORE_GCS_ENDPOINT_URL`` sets the endpoint;
gcsfs also honours ``STORAGE_EMULATOR_HOST``, and when that is set and no ``token`` is
given, access is anonymous (as with Google's own client library).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import ModuleType
from typing import Any

from mlstore._util.redact import redact_url
from mlstore.backends._cloud import CloudUpload, ObjectStoreBackend
from mlstore.backends._errors import Answer, Service, refuse_corrupt
from mlstore.backends._fsspec import ShortBodyError, transport_error
from mlstore.backends._ranges import range_header
from mlstore.backends.base import ObjectInfo, find_cause
from mlstore.errors import (
    ConfigError,
    MlstoreError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
)
from mlstore.hashing import BLOCKS_KEY, METADATA_KEY
from mlstore.url import URL

__all__ = ["GCSBackend", "GCSUpload"]

log = logging.getLogger("mlstore")

#: GCS composes at most this many objects in one request.
_COMPOSE_MAX = 32
#: Where an upload's parts wait, beside the object: ``<dir>/.mlstore-uploads/<id>/``.
UPLOADS_DIR = ".mlstore-uploads"

_UNUSABLE_CREDENTIALS = (
    "the GCS credentials could not be used; set GOOGLE_APPLICATION_CREDENTIALS, log in with "
    "gcloud, or pass Store(options={'gs': {'anon': True}}) for public buckets"
)


class GCSBackend(ObjectStoreBackend):
    protocol = "gs"
    identity_env = (
        "MLSTORE_GCS_ENDPOINT_URL",
        "STORAGE_EMULATOR_HOST",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_OAUTH_ACCESS_TOKEN",
        "GOOGLE_CLOUD_PROJECT",
    )
    max_parts = 1024  # the components of one composite object
    # GCS sends no error codes that say more than the status.
    service = Service(
        "GCS",
        "check the credentials and the bucket's IAM policy",
        pin="generation precondition",
    )

    def _make_fs(self) -> Any:
        import aiohttp

        from mlstore.backends._gcsfs import OneAttemptGCSFileSystem

        opts = dict(self.options)
        endpoint = opts.pop("endpoint_url", None) or os.environ.get("MLSTORE_GCS_ENDPOINT_URL")
        anon = bool(opts.pop("anon", False))
        if anon:
            if opts.get("token") not in (None, "anon"):
                raise ConfigError("give either the gs option 'anon' or 'token', not both")
            opts["token"] = "anon"
        elif opts.get("token") is None and os.environ.get("STORAGE_EMULATOR_HOST"):
            opts["token"] = "anon"  # an emulator: no credentials to find or send
        if opts.get("token") is None:
            opts.pop("token", None)
        retry = self.config.retry
        opts.setdefault(
            "requests_timeout",
            aiohttp.ClientTimeout(
                total=None, sock_connect=retry.connect_timeout, sock_read=retry.read_timeout
            ),
        )
        try:
            fs = OneAttemptGCSFileSystem(
                endpoint_url=endpoint or None,
                skip_instance_cache=True,
                use_listings_cache=False,
                **opts,
            )
        except TypeError as exc:
            raise ConfigError(f"invalid gs option: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - credential set-up; the text may hold secrets
            raise ConfigError(
                f"could not set up GCS credentials ({type(exc).__name__}); check the gs "
                "option 'token' or GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        return fs

    @property
    def _api(self) -> ModuleType:
        """:mod:`mlstore.backends._gcsfs`, which imports gcsfs: reached through the client,
        so a missing gcsfs is a ConfigError that says what to install."""
        _ = self.fs
        from mlstore.backends import _gcsfs

        return _gcsfs

    def _version(self, raw: Mapping[str, Any]) -> str | None:
        generation = raw.get("generation")
        return str(generation) if generation else None

    def _info_from(self, raw: Mapping[str, Any]) -> ObjectInfo:
        info = super()._info_from(raw)
        if info.is_dir:
            return info
        checksums = {
            name: str(raw[field])
            for name, field in (("md5", "md5Hash"), ("crc32c", "crc32c"))
            if raw.get(field)
        }
        metadata = raw.get("metadata") or {}
        return replace(
            info,
            checksums=checksums,
            content_hash=metadata.get(METADATA_KEY),
            block_digests=metadata.get(BLOCKS_KEY),
        )

    # ---- errors: the one place where GCS failures become mlstore errors
    def _answer(self, exc: BaseException) -> Answer | None:
        api = sys.modules.get("mlstore.backends._gcsfs")  # not loaded: no request was made
        found: Answer | None = api.answer(exc) if api is not None else None
        return found

    def _sdk_error(self, exc: Exception, url: URL, operation: str) -> MlstoreError | None:
        import google.auth.exceptions as gae

        # google-auth's TransportError is a GoogleAuthError too: a dropped connection
        # while fetching a token is worth retrying, so it is looked for first.
        transport = transport_error(
            exc, url, operation, dropped=(ShortBodyError, gae.TransportError)
        )
        if transport is None and find_cause(exc, gae.GoogleAuthError) is not None:
            return PermissionDeniedError(_UNUSABLE_CREDENTIALS, url=str(url), operation=operation)
        return transport

    # ---- the requests
    def _stat(self, url: URL) -> ObjectInfo:
        raw = self._sync(self._api.metadata, url.bucket, url.path, None)
        return self._info_from(self.fs._process_object(url.bucket, raw))

    def _has_below(self, url: URL) -> bool:
        return bool(self._sync(self._api.has_prefix, url.bucket, url.path))

    def _directory(self, url: URL) -> ObjectInfo:
        if not url.path:  # the bucket itself, with its metadata
            return self._info_from(self.fs.info(url.bucket))
        return super()._directory(url)

    def _size(self, url: URL, version: str | None) -> int:
        # The size of the generation being read, not of whatever is live now.
        raw = self._sync(self._api.metadata, url.bucket, url.path, version)
        return int(raw.get("size") or 0)

    def _download(self, url: URL, want: slice, version: str | None) -> tuple[bytes, str | None]:
        rng = range_header(want)
        status, headers, data = self._sync(self._api.media, url.bucket, url.path, rng, version)
        served = headers.get("x-goog-generation")
        if version is not None and served and served != version:
            raise PreconditionFailedError(
                f"generation {version} was asked for, but generation {served} was served",
                url=str(url),
                operation="read",
            )
        if rng is None:
            refuse_corrupt(
                data,
                headers.get(f"x-goog-meta-{METADATA_KEY}"),
                url,
                version=served,
                served=_served_hashes(headers),
            )
        elif status == 200:  # the server ignored the Range header and sent everything
            data = data[want]
        return bytes(data), served

    def _missing_on_read(
        self, url: URL, version: str | None, err: NotFoundError, exc: BaseException
    ) -> MlstoreError:
        """A 404 on a read. Pinned: if the object still exists, the pinned generation is
        gone (replaced), never to be read as another generation. Not pinned: the URL may
        name a directory. Otherwise the object is missing."""
        if version is None:
            return super()._missing_on_read(url, version, err, exc)
        try:
            raw = self._sync(self._api.metadata, url.bucket, url.path, None)
        except Exception as cause:  # translated below
            check = self._translate(cause, url, "read")
            if isinstance(check, NotFoundError):
                return err  # deleted, not replaced
            raise check from cause
        return PreconditionFailedError(
            f"the object changed while it was read (generation {version} is now "
            f"{raw.get('generation')})",
            url=str(url),
            operation="read",
        )

    def _upload(self, url: URL, data: bytes, metadata: dict[str, str]) -> str | None:
        # gcsfs does not hand back the generation it made: no version to prove.
        self.fs.pipe_file(self._path(url), data, metadata=metadata)
        return None

    def _begin(self, url: URL, metadata: dict[str, str]) -> GCSUpload:
        return GCSUpload(self, url, metadata)

    def _create_bucket(self, bucket: str) -> None:
        try:
            super()._create_bucket(bucket)
        except Exception as exc:  # 409: created meanwhile
            if self._status(exc) != 409:
                raise


class GCSUpload(CloudUpload):
    """A GCS upload in parts, by composition: each part is stored as an object of its
    own (one media upload, so sending it again replaces it), and ``complete`` composes
    them into the object (32 at a time, in a tree when there are more) with the
    object's metadata, then deletes them. The parts wait in
    ``<dir>/.mlstore-uploads/<id>/`` beside the object, where whoever may write the
    object may write; nothing appears at the object's URL before ``complete``, and
    ``abort`` deletes them. GCS's resumable uploads were the other way: their chunks go
    one at a time, in order, and a chunk sent again after a lost answer must first ask
    how much arrived, which the emulator the tests run on cannot answer.

    A compose request takes the object's metadata, so a streamed object records its
    content hash too. (Composite objects have no MD5; reads are checked against that
    hash.) Up to 1,024 parts: GCS's documented limit on a composite's components.
    """

    records_at_commit = True

    def __init__(self, backend: GCSBackend, url: URL, metadata: dict[str, str]) -> None:
        super().__init__(backend, url, metadata)
        self.gcs = backend
        parent = url.path.rpartition("/")[0]
        upload = f"{UPLOADS_DIR}/{uuid.uuid4().hex}/"
        self.prefix = f"{parent}/{upload}" if parent else upload

    def _put(self, number: int, data: bytes) -> str:
        name = f"{self.prefix}{number:05d}"
        self.gcs._sync(self.gcs._api.upload_media, self.url.bucket, name, data)
        return name

    def _complete(self, parts: Sequence[str], metadata: dict[str, str]) -> str | None:
        api, bucket = self.gcs._api, self.url.bucket
        names, level = list(parts), 0
        while len(names) > _COMPOSE_MAX:  # compose groups of 32, then those
            level += 1
            groups = [names[i : i + _COMPOSE_MAX] for i in range(0, len(names), _COMPOSE_MAX)]
            names = []
            for i, group in enumerate(groups):
                name = f"{self.prefix}c{level}-{i:05d}"
                self.gcs._sync(api.compose, bucket, name, group, None)
                names.append(name)
        made = self.gcs._sync(api.compose, bucket, self.url.path, names, metadata)
        self._tidy()
        generation = made.get("generation")
        return str(generation) if generation else None

    def _abort(self) -> None:
        names = self.gcs._sync(self.gcs._api.list_names, self.url.bucket, self.prefix)
        left = self.gcs._sync(self.gcs._api.delete_quietly, self.url.bucket, names)
        if left:
            raise ConnectionError(f"{left} of the upload's parts could not be deleted")

    def _tidy(self) -> None:
        """Delete the parts once the object is made; a part left over is reported, not
        raised: the write itself succeeded."""
        try:
            self._abort()
        except Exception as exc:  # noqa: BLE001 - the object is written
            log.warning(
                "%s: written, but the upload's parts below %s could not all be deleted (%s)",
                redact_url(str(self.url)),
                self.prefix,
                type(exc).__name__,
            )


def _served_hashes(headers: Mapping[str, str]) -> dict[str, str]:
    """The ``x-goog-hash`` headers (``crc32c=...,md5=...``, in one header or several)
    as ``{"crc32c": ..., "md5": ...}``."""
    getall = getattr(headers, "getall", None)
    values = getall("x-goog-hash", []) if getall is not None else [headers.get("x-goog-hash")]
    out: dict[str, str] = {}
    for part in ",".join(v for v in values if v).split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name.lower()] = value
    return out
