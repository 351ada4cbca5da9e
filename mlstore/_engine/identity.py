"""What names a cached object on the node.

The node cache is shared by every process on the node, and processes differ: two jobs
may use one bucket name on two S3 endpoints (an emulator and AWS, MinIO and GCS's S3
API), one mount name for two different prefixes, or one URL with credentials that the
server treats differently. A cached copy must only be served to a Store that would have
been given the same object. So a node key is the *physical* URL (a mount resolves to
its primary replica, so a read through a mount and a write to the physical URL touch
the same entry) followed by the *scope* of the Store's backend for that protocol: a
digest of everything that decides which service answers and as whom: the backend
options (endpoint, account, credentials, headers) and the environment variables the
backend reads for the same purpose (:attr:`~mlstore.backends.base.Backend.identity_env`).

Two Stores with the same scope share entries; any difference is a miss, never a wrong
object or an authorization bypass: a Store with other credentials fetches (and so shows
the server lets it read) before it is served. Blobs are content-addressed, so the same
bytes reached under two scopes are still stored once.

The digest covers secrets (that is the point), so it is a cryptographic one, truncated
to 16 hex digits: it names a scope without revealing anything about its credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from typing import Any

from mlstore.backends.base import get_backend_class
from mlstore.config import StoreConfig
from mlstore.url import URL

__all__ = ["CACHED_PROTOCOLS", "Identity", "options_for"]

#: The protocols whose objects the node caches (local files and ``memory://`` are read
#: directly: caching them would only copy bytes that are already local).
CACHED_PROTOCOLS = frozenset({"s3", "gs", "az", "http", "https"})


def options_for(config: StoreConfig, protocol: str) -> Mapping[str, Any]:
    """The backend options of ``protocol`` (``http`` and ``https`` share theirs)."""
    options = config.options
    found = options.get(protocol, {})
    if protocol in ("http", "https") and not found:
        found = options.get("https" if protocol == "http" else "http", {})
    return found


class Identity:
    """Node keys of one Store's objects (see the module docstring)."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._scopes: dict[str, str] = {}
        self._lock = threading.Lock()

    def scope(self, protocol: str) -> str:
        """The digest of what decides which service answers ``protocol``, and as whom."""
        found = self._scopes.get(protocol)
        if found is None:
            try:
                names = get_backend_class(protocol).identity_env
            except Exception:  # noqa: BLE001 - an unusable backend fails later, on use
                names = ()
            material = {
                "protocol": protocol,
                "options": options_for(self.config, protocol),
                "env": {name: os.environ.get(name) for name in names},
            }
            text = json.dumps(material, sort_keys=True, default=repr)
            found = hashlib.sha256(text.encode()).hexdigest()[:16]
            with self._lock:
                self._scopes[protocol] = found
        return found

    def key(self, physical: URL) -> str:
        """The node key of the object at the physical URL ``physical``."""
        return f"{physical}#{self.scope(physical.protocol)}"
