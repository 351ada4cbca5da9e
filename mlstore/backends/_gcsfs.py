"""gcsfs's ``GCSFileSystem`` with every request sent once, and the JSON and media API
requests the gs backend makes through it.

This module imports gcsfs, so :mod:`mlstore.backends.gcs` imports it only when it builds
its first client: ``import mlstore``, and even making a Store with gs options, load no
gcsfs.

gcsfs wraps ``_request`` (every JSON/media API call) and its download helpers in
``retry_request``, whose six attempts are fixed when the class is defined: setting
``retries`` on an instance changes nothing. Its batch delete resubmits failed entries up
to five times. :class:`OneAttemptGCSFileSystem` replaces ``_request`` with one attempt
that keeps the status, the headers and the server's message on the error it raises
(gcsfs raises ``FileNotFoundError``, ``OSError``, ``FileExistsError``, ``ValueError`` or
``HttpError`` depending on the status, and keeps none of them), takes the download
helpers without their wrapper, and deletes objects one request each. The test
``tests/test_gcs.py::test_gcsfs_still_has_what_the_one_attempt_filesystem_replaces``
pins the gcsfs behaviour this relies on.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from fsspec import asyn
from gcsfs.core import GCSFileSystem
from gcsfs.retry import HttpError, validate_response

from mlstore._util.files import ViewReader
from mlstore.backends._errors import Answer
from mlstore.backends._fsspec import ShortBodyError
from mlstore.backends.base import InterruptedBodyError

__all__ = [
    "OneAttemptGCSFileSystem",
    "answer",
    "compose",
    "delete_quietly",
    "has_prefix",
    "list_names",
    "media",
    "metadata",
    "upload_media",
]

_NAMES = "items(name),nextPageToken"  # what a listing of names asks for
# Deletes of an upload's temporary objects in flight at once.
_DELETE_CONCURRENCY = 16

_CHUNK = 1 << 20  # media bodies are read in chunks: what arrived can be resumed from
# The attribute that carries the Answer on an exception raised for an error answer.
_ANSWER = "_mlstore_answer"


def _unwrapped(name: str) -> Any:
    """``GCSFileSystem.<name>`` without gcsfs's ``retry_request`` wrapper."""
    fn = getattr(GCSFileSystem, name)
    return getattr(fn, "__wrapped__", fn)


class Sink:
    """What a media download has received so far (filled in by ``_request``)."""

    def __init__(self) -> None:
        self.headers: Mapping[str, str] | None = None
        self.status = 0
        self.chunks: list[bytes] = []


class OneAttemptGCSFileSystem(GCSFileSystem):  # type: ignore[misc]
    """gcsfs's core ``GCSFileSystem`` with every request made exactly once."""

    retries = 1

    async def _request(
        self,
        method: str,
        path: str,
        *args: Any,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: Any = None,
        cache_type: Any = None,
        cache_source: Any = None,
        sink: Sink | None = None,
        **kwargs: Any,
    ) -> tuple[int, Any, Any, bytes]:
        await self._set_session()
        if isinstance(data, (bytes, bytearray, memoryview)) and len(data) > 2**20:
            # aiohttp warns that a large raw-bytes body may block the event loop and
            # asks for a file object; BytesIO shares a bytes buffer without a copy.
            data = io.BytesIO(data)
        elif hasattr(data, "seek"):
            data.seek(0)
        extra = {}
        if cache_type is not None or cache_source is not None:
            extra = {"cache_type": cache_type, "cache_source": cache_source}
        async with self.session.request(
            method=method,
            url=self._format_path(path, args),
            params=self._get_params(kwargs),
            json=json,
            headers=self._get_headers(headers, **extra),
            data=data,
            timeout=self.requests_timeout,
        ) as r:
            status = r.status
            out_headers = r.headers
            info = r.request_info
            if sink is not None and status < 400:
                # Read in chunks so that, if the body stops early, what arrived can be
                # resumed from (see media).
                sink.headers, sink.status = out_headers, status
                async for chunk in r.content.iter_chunked(_CHUNK):
                    sink.chunks.append(chunk)
                contents = b"".join(sink.chunks)
            else:
                contents = await r.read()
        if status >= 400:
            try:
                validate_response(status, contents, path, args)
            except Exception as exc:
                kept = Answer(status, reason=_error_reason(contents), headers=dict(out_headers))
                setattr(exc, _ANSWER, kept)
                raise
        return status, out_headers, info, contents

    _get_file_request = _unwrapped("_get_file_request")
    _get_file_concurrent = _unwrapped("_get_file_concurrent")

    async def _delete_files(self, files: list[str], batchsize: int) -> list[Any]:
        # Not the batch endpoint: gcsfs resubmits failed batch entries itself.
        out: list[Any] = await asyn._run_coros_in_chunks(
            [self._rm_file(f) for f in files], return_exceptions=True, batch_size=32
        )
        return out


def answer(exc: BaseException | None) -> Answer | None:
    """The first error answer in ``exc``'s chain: the one ``_request`` kept, or the
    status of a gcsfs ``HttpError``."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        kept = getattr(exc, _ANSWER, None)
        if isinstance(kept, Answer):
            return kept
        if isinstance(exc, HttpError):
            try:
                code = int(exc.code)
            except (TypeError, ValueError):
                code = 0
            if code:
                return Answer(code)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _error_reason(contents: bytes) -> str:
    """The server's short error message, from a JSON error body."""
    try:
        error = json.loads(contents)["error"]
        message = error if isinstance(error, str) else error.get("message", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""
    return str(message)[:200]


# ---- coroutines run on gcsfs's event loop


async def metadata(fs: Any, bucket: str, key: str, generation: str | None) -> Mapping[str, Any]:
    """The object resource (JSON API ``objects.get``), of one generation if given."""
    _, _, _, contents = await fs._request("GET", "b/{}/o/{}", bucket, key, generation=generation)
    result: Mapping[str, Any] = json.loads(contents)
    return result


async def has_prefix(fs: Any, bucket: str, key: str) -> bool:
    """Whether any object's name starts with ``key/`` (a "directory")."""
    prefix = key.rstrip("/") + "/"
    _, _, _, contents = await fs._request(
        "GET", "b/{}/o", bucket, prefix=prefix, delimiter="/", maxResults=1
    )
    listing = json.loads(contents)
    return bool(listing.get("items") or listing.get("prefixes"))


async def media(
    fs: Any, bucket: str, key: str, rng: str | None, generation: str | None
) -> tuple[int, Mapping[str, str], bytes]:
    """The object's bytes (``alt=media``), a range of them, of one generation if given.

    A body that stops early raises :class:`InterruptedBodyError` with what arrived and
    the generation it belongs to, so the Store resumes with a range of that generation.
    """
    path = fs._location + "/download/storage/v1/b/{}/o/{}"
    headers = {"Range": rng} if rng else {}
    body = Sink()
    try:
        status, got, _, data = await fs._request(
            "GET", path, bucket, key, headers=headers, alt="media", generation=generation, sink=body
        )
    except Exception as exc:
        # Resumable only if the bytes line up: not decompressed, and the range (if one
        # was asked for) honoured rather than answered with the whole object.
        honoured = not rng or body.status == 206
        if body.headers is not None and honoured and not body.headers.get("Content-Encoding"):
            length = body.headers.get("Content-Length")
            raise InterruptedBodyError(
                b"".join(body.chunks),
                body.headers.get("x-goog-generation"),
                int(length) if length is not None else None,
            ) from exc
        raise
    expected = got.get("Content-Length")
    if expected is not None and not got.get("Content-Encoding") and len(data) != int(expected):
        short = ShortBodyError(f"the body ended after {len(data)} of {expected} bytes")
        if rng and status != 206:
            raise short
        raise InterruptedBodyError(data, got.get("x-goog-generation"), int(expected)) from short
    return status, got, data


async def upload_media(fs: Any, bucket: str, key: str, data: bytes) -> str:
    """Store ``data`` as the object ``key`` (one media upload, no metadata); its
    generation. The body is a file over ``data`` (see ``ViewReader``): no copy."""
    path = fs._location + "/upload/storage/v1/b/{}/o"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
    with ViewReader(data) as body:
        _, _, _, contents = await fs._request(
            "POST", path, bucket, uploadType="media", name=key, data=body, headers=headers
        )
    return str(json.loads(contents).get("generation") or "")


async def compose(
    fs: Any, bucket: str, key: str, sources: list[str], metadata: dict[str, str] | None
) -> Mapping[str, Any]:
    """Make ``key`` the concatenation of ``sources`` (at most 32), with ``metadata``;
    the object resource made."""
    destination: dict[str, Any] = {"contentType": "application/octet-stream"}
    if metadata:
        destination["metadata"] = metadata
    body = {
        "kind": "storage#composeRequest",
        "sourceObjects": [{"name": name} for name in sources],
        "destination": destination,
    }
    _, _, _, contents = await fs._request(
        "POST",
        "b/{}/o/{}/compose",
        bucket,
        key,
        json=body,
        headers={"Content-Type": "application/json"},
    )
    result: Mapping[str, Any] = json.loads(contents)
    return result


async def list_names(fs: Any, bucket: str, prefix: str) -> list[str]:
    """The names of every object below ``prefix``."""
    names: list[str] = []
    token = None
    while True:
        _, _, _, contents = await fs._request(
            "GET",
            "b/{}/o",
            bucket,
            prefix=prefix,
            pageToken=token,
            fields="items(name),nextPageToken",
        )
        listing = json.loads(contents)
        names += [item["name"] for item in listing.get("items", [])]
        token = listing.get("nextPageToken")
        if not token:
            return names


async def delete_quietly(fs: Any, bucket: str, names: list[str]) -> int:
    """Delete ``names``, a few at a time; how many could not be deleted (a name already
    gone counts as deleted)."""
    import asyncio

    gate = asyncio.Semaphore(_DELETE_CONCURRENCY)

    async def one(name: str) -> bool:
        async with gate:
            try:
                await fs._request("DELETE", "b/{}/o/{}", bucket, name)
            except Exception as exc:  # noqa: BLE001 - reported as a count
                found = answer(exc)
                return found is not None and found.status == 404
            return True

    done = await asyncio.gather(*(one(n) for n in names))
    return sum(1 for ok in done if not ok)
