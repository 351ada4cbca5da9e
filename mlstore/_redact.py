"""Keeping credentials out of log output.

mlstore never logs a credential itself, but the SDKs under it do at DEBUG level
(botocore logs request headers, which carry the session token and the access key id).
Every credential a backend is given, or finds in the standard environment variables,
is registered here; once one is registered, a log-record factory masks registered
values in every record's message before any handler sees it. The factory does nothing
until a secret is registered, and records are only built for enabled levels, so the
cost with DEBUG off is nil.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Any

from mlstore.config import SECRET_OPTION

__all__ = ["mask", "register_environment", "register_options", "register_secret"]

MASK = "***"
_MIN_LENGTH = 6  # shorter values would mask ordinary words
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None
_lock = threading.Lock()
_installed = False

# Standard variables that hold credentials for the clouds mlstore talks to.
_ENV_SECRETS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_CLIENT_SECRET",
    "GOOGLE_OAUTH_ACCESS_TOKEN",
)
# Parts of a connection string that are credentials.
_CONN_PARTS = re.compile(r"(?:AccountKey|SharedAccessSignature|SharedAccessKey)=([^;]+)", re.I)


def register_secret(value: object) -> None:
    """Mask ``value`` (and its credential parts, for connection strings) in log output."""
    if not isinstance(value, str) or len(value) < _MIN_LENGTH:
        return
    found = {value, *(m.group(1) for m in _CONN_PARTS.finditer(value))}
    found = {v for v in found if len(v) >= _MIN_LENGTH}
    with _lock:
        if found <= _secrets:
            return
        _secrets.update(found)
        global _pattern
        ordered = sorted(_secrets, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(s) for s in ordered))
    _install()


def register_options(options: Mapping[str, Any]) -> None:
    """Register every value of ``options`` whose name looks like a credential."""
    for key, value in options.items():
        if isinstance(value, Mapping):
            register_options(value)
        elif isinstance(key, str) and SECRET_OPTION.search(key):
            register_secret(value)
            # credential objects (google-auth, azure-identity) carry a token attribute
            register_secret(getattr(value, "token", None))


def register_environment() -> None:
    """Register the credentials found in the standard environment variables."""
    for name in _ENV_SECRETS:
        register_secret(os.environ.get(name))


def mask(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(MASK, text)


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _pattern is not None:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a broken format is the logger's business
                return record
            masked = mask(message)
            if masked != message:
                record.msg, record.args = masked, None
        return record

    logging.setLogRecordFactory(factory)
