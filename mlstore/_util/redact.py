"""Every rule that keeps credentials out of sight, in one place.

- :data:`SECRET_OPTION`: backend option names that hold credentials (never pickled,
  never shown; :func:`redact_options`).
- :data:`SECRET_PARAMS`: URL query parameters that carry credentials (presigned S3
  URLs, SAS tokens, signed GCS URLs; :func:`redact_url`).
- :data:`SECRET_TEXT`: credential parts quoted inside free text (connection-string
  keys, SAS signatures; :func:`scrub`).
- The log-record mask below.

Keeping credentials out of log output:

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
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "MASK",
    "SECRET_OPTION",
    "SECRET_PARAMS",
    "SECRET_TEXT",
    "mask",
    "redact_options",
    "redact_protocol_options",
    "redact_url",
    "register_environment",
    "register_options",
    "register_secret",
    "scrub",
]

MASK = "***"

#: Backend option names that hold credentials: never pickled, never shown.
SECRET_OPTION = re.compile(
    r"(secret|token|password|passwd|credential|sas|account_key|connection_string|"
    r"access_key|key_id|^key$|session|private|auth|headers)",
    re.IGNORECASE,
)
#: Query parameters that carry credentials: presigned S3 URLs, Azure SAS tokens, GCS
#: signed URLs, and the usual token-ish names.
SECRET_PARAMS = re.compile(
    r"^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)"
    r"|sig|signature|se|sp|sv|st|skoid|sktid|skt|ske|sks|skv|token|access_token"
    r"|api[-_]?key|key|password|secret|code|sas)$",
    re.IGNORECASE,
)
#: Credentials quoted in free text: connection-string keys and SAS signatures.
SECRET_TEXT = re.compile(
    r"(AccountKey|SharedAccessSignature|sig|SharedAccessKey)=[^;&\s'\"]+", re.IGNORECASE
)
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
    """Register every value of ``options`` whose name looks like a credential, at any
    depth: SDK options nest them (``client_kwargs={"aws_access_key_id": ...}``), and the
    SDKs log them from there. The same names :func:`redact_options` drops are masked."""
    for key, value in options.items():
        if isinstance(key, str) and SECRET_OPTION.search(key):
            _register_all(value)
        elif isinstance(value, Mapping):
            register_options(value)


def _register_all(value: object) -> None:
    """Register ``value`` and, if it is a container (``credentials={...}``), everything
    in it: below a credential's name, every part is taken for a credential."""
    if isinstance(value, Mapping):
        for item in value.values():
            _register_all(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _register_all(item)
    else:
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


def scrub(text: str) -> str:
    """``text`` with every credential it might quote masked: the registered values, and
    anything shaped like a connection-string key or a SAS signature."""
    return SECRET_TEXT.sub(lambda m: f"{m.group(1)}={MASK}", mask(text))


def redact_options(options: Mapping[str, Any], replacement: object = None) -> dict[str, Any]:
    """``options`` with every value whose name looks like a credential replaced by
    ``replacement``, or dropped when ``replacement`` is ``None``; nested dicts (such as
    ``client_kwargs``) are searched too."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(key, str) and SECRET_OPTION.search(key):
            if replacement is not None:
                out[key] = replacement
        elif isinstance(value, Mapping):
            out[key] = redact_options(value, replacement)
        else:
            out[key] = value
    return out


def redact_protocol_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Per-protocol backend options (``{"s3": {...}, ...}``) without credentials: what
    may cross a pickle (the receiving process re-resolves credentials itself)."""
    return {p: redact_options(o) if isinstance(o, Mapping) else o for p, o in options.items()}


def redact_url(url: str) -> str:
    """Return ``url`` with user info and credential-bearing query values masked.

    >>> redact_url("https://user:pw@host/a?sig=abc&x=1")
    'https://***@host/a?sig=***&x=1'
    """
    if "://" not in url or ("@" not in url and "?" not in url):
        return url  # nothing to mask: no user info, no query (and no parsing cost)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc and not parts.query:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if SECRET_PARAMS.match(k) else v) for k, v in pairs],
            safe="*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
