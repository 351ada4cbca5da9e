"""The life of the az backend's Azure SDK client: made without retries, closed only by
the process that made it, and never touched by a forked child.

adlfs resolves the credentials and builds an asynchronous ``BlobServiceClient``;
:func:`adopt` replaces it with an identical client whose SDK retry policy makes exactly
one attempt (mlstore is the one retry layer) and whose timeouts come from
:class:`~mlstore.config.RetryPolicy`, and takes over closing it from adlfs.

It also holds the writes the backend makes through the SDK: a whole blob (:func:`put`),
and the blocks of an upload in parts and their commit (:func:`stage`, :func:`commit`). The Azure
SDK is imported inside the functions, so importing this module (with
:mod:`mlstore.backends.azure`) loads no SDK.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import io
import os
import weakref
from typing import Any
from urllib.parse import urlsplit

from mlstore.config import StoreConfig

__all__ = ["BLOCK_SIZE", "SINGLE_PUT_SIZE", "adopt", "commit", "etag", "put", "stage"]

# Writes up to this size are one Put Blob request; larger ones are staged in blocks of
# BLOCK_SIZE. A block size above 4 MiB lets the SDK stream blocks from the source
# instead of copying each into a ``bytes``.
SINGLE_PUT_SIZE = 64 * 1024 * 1024
# Staged uploads send this many blocks at a time.
UPLOAD_CONCURRENCY = 4
BLOCK_SIZE = 8 * 1024 * 1024

# The clients (and credentials) made in this process, and those a forked child inherited.
_MADE_HERE: weakref.WeakSet[Any] = weakref.WeakSet()
_INHERITED: list[Any] = []


def adopt(
    fs: Any, config: StoreConfig, endpoint: str | None, credential_given: bool
) -> weakref.finalize[Any, Any]:
    """Give the adlfs filesystem ``fs`` a client without retries, and own its closing.

    adlfs closes its client at exit through fsspec's loop thread, which a forked child
    does not have: a child that exits normally would hang. adlfs's finalizers are
    detached; the returned finalizer closes the client (and a credential adlfs made,
    not one the caller gave) only in the process that made it.

    Args:
        fs: an ``adlfs.AzureBlobFileSystem`` that has built its client.
        config: the Store's configuration (timeouts).
        endpoint: the blob service URL to use instead of the client's, if any.
        credential_given: whether the caller passed the credential object (then it is
            the caller's to close).
    """
    client = _without_retries(fs.service_client, endpoint, config)
    fs.service_client = client
    _detach_finalizers(fs)
    made_here = None if credential_given else fs.credential
    closer = weakref.finalize(fs, _close_client, os.getpid(), fs.loop, client, made_here)
    _MADE_HERE.add(client)
    if made_here is not None:
        _MADE_HERE.add(made_here)
    return closer


def _without_retries(client: Any, endpoint: str | None, config: StoreConfig) -> Any:
    """``client`` rebuilt with the same account URL and credential, the Azure SDK's
    retries off and mlstore's timeouts."""
    from azure.storage.blob.aio import BlobServiceClient

    url = str(client.url)
    if endpoint:
        query = urlsplit(url).query  # a SAS token rides on the account URL
        url = endpoint.rstrip("/") + "/" + (f"?{query}" if query else "")
    retry = config.retry
    return BlobServiceClient(
        account_url=url,
        credential=client.credential,
        secondary_hostname=client.secondary_hostname,
        # mlstore is the one retry layer: the SDK makes exactly one attempt.
        retry_total=0,
        retry_connect=0,
        retry_read=0,
        retry_status=0,
        retry_to_secondary=False,
        connection_timeout=retry.connect_timeout,
        read_timeout=retry.read_timeout,
        max_single_put_size=SINGLE_PUT_SIZE,
        max_block_size=BLOCK_SIZE,
        user_agent="mlstore",
    )


def _keep_inherited() -> None:
    """In a forked child, keep the parent's clients alive and untouched for good.

    Their sockets and their event loop's epoll instance are shared with the parent.
    Closing one here, or freeing it (aiohttp then closes its pooled connections), would
    unregister the parent's sockets from that epoll instance: the parent would wait
    forever for its next response. So they are never closed in the child and never
    freed, not even at interpreter exit (an extra reference that nothing releases).
    """
    for obj in list(_MADE_HERE):
        _INHERITED.append(obj)
        try:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))
        except (AttributeError, OSError):  # pragma: no cover - not CPython
            pass
    _MADE_HERE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_keep_inherited)


def _detach_finalizers(obj: object) -> None:
    """Detach the ``weakref.finalize`` callbacks registered on ``obj`` (adlfs's)."""
    registry = getattr(weakref.finalize, "_registry", None)
    if not isinstance(registry, dict):  # pragma: no cover - not CPython's finalize
        return
    for finalizer in list(registry):
        found = finalizer.peek()
        if found is not None and found[0] is obj:
            finalizer.detach()


def _close_client(owner: int, loop: Any, client: Any, credential: Any) -> None:
    """Close ``client`` (and a credential adlfs made) on ``loop``, in process ``owner``
    only: in a forked child the loop's thread does not exist."""
    if os.getpid() != owner or loop.is_closed():
        return

    async def close() -> None:
        await client.close()
        closing = getattr(credential, "close", None)
        if callable(closing):
            result = closing()
            if inspect.isawaitable(result):
                await result

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    try:
        if running is not None and running is loop:  # on the loop's own thread: no waiting
            running.create_task(close())
        else:
            from fsspec.asyn import sync

            sync(loop, close, timeout=10)
    except Exception:  # noqa: BLE001 - closing is best effort
        pass


def etag(value: Any) -> str | None:
    """An Azure ETag as mlstore reports versions: always in double quotes."""
    if not value:
        return None
    return '"' + str(value).strip('"') + '"'


async def put(
    service: Any, container: str, blob: str, data: bytes, metadata: dict[str, str]
) -> str | None:
    """Replace ``blob`` with ``data``: one Put Blob up to 64 MiB, staged blocks above.

    Bodies go to aiohttp as file objects, never as one large ``bytes`` (which aiohttp
    warns about): the single put calls the SDK's generated operation with a ``BytesIO``
    (``upload_blob`` would hand aiohttp the raw bytes), and the staged upload reads
    blocks of ``BLOCK_SIZE`` from a seekable stream.
    """
    client = service.get_blob_client(container, blob)
    if len(data) <= SINGLE_PUT_SIZE:
        headers = {f"x-ms-meta-{k}": v for k, v in metadata.items()}
        made: Any = await client._client.block_blob.upload(
            content_length=len(data),
            body=io.BytesIO(data),
            headers=headers,
            cls=lambda _response, _body, answer: answer.get("ETag"),
        )
        return etag(made)
    done = await client.upload_blob(
        io.BytesIO(data),
        length=len(data),
        overwrite=True,
        metadata=metadata,
        max_concurrency=UPLOAD_CONCURRENCY,
    )
    return etag(done.get("etag"))


async def stage(service: Any, container: str, blob: str, block_id: str, data: bytes) -> None:
    """Put Block: ``data`` staged under ``block_id`` (base64), not yet part of the blob.
    The generated operation, with a file over ``data`` as the body (see ``ViewReader``:
    aiohttp would copy a ``BytesIO``'s buffer)."""
    from mlstore._util.files import ViewReader

    client = service.get_blob_client(container, blob)
    with ViewReader(data) as body:
        await client._client.block_blob.stage_block(
            block_id=block_id, content_length=len(data), body=body
        )


async def commit(
    service: Any, container: str, blob: str, block_ids: list[str], metadata: dict[str, str]
) -> str | None:
    """Put Block List: the blob becomes the staged blocks ``block_ids``, in order, with
    ``metadata``; the ETag made."""
    from azure.storage.blob._generated.models import BlockLookupList

    client = service.get_blob_client(container, blob)
    headers = {f"x-ms-meta-{k}": v for k, v in metadata.items()}
    made: Any = await client._client.block_blob.commit_block_list(
        blocks=BlockLookupList(latest=block_ids),
        headers=headers,
        cls=lambda _response, _body, answer: answer.get("ETag"),
    )
    return etag(made)
