"""The s3, gs and az backends of the obstore transport (``StoreConfig.transport =
"obstore"``, ``pip install 'mlstore[fast]'``); see :mod:`mlstore.backends._obstore`.

Each class is its fsspec backend with the object requests made through obstore. The
same Store options configure both halves; this module turns them into obstore's:

- s3: ``endpoint_url``, ``region_name`` (also in ``client_kwargs``), ``key``,
  ``secret``, ``token``, ``anon``, ``requester_pays``; otherwise obstore reads the
  standard ``AWS_*`` variables. A ``profile`` cannot be honoured (refused). obstore does
  not look up a bucket's region: give ``region_name`` (or ``AWS_DEFAULT_REGION``) for a
  bucket outside ``us-east-1``.
- gs: ``endpoint_url`` (or ``STORAGE_EMULATOR_HOST``), ``anon`` / ``token="anon"``
  (and an emulator with no token) for unsigned requests, ``token`` as a path to a
  credentials file, a service-account dict or a google-auth credentials object;
  otherwise Application Default Credentials. Writes stay on gcsfs: obstore writes
  through GCS's XML API, which the emulator the tests run on does not accept, and an
  upload path that no test exercises is not shipped.
- az: ``connection_string`` (or ``AZURE_STORAGE_CONNECTION_STRING``), ``account_name``,
  ``account_key``, ``sas_token``, ``anon``, ``endpoint_url``, ``account_host``,
  ``client_id``/``client_secret``/``tenant_id`` and a ``credential`` object with
  ``get_token`` (azure-identity); otherwise obstore reads the ``AZURE_STORAGE_*``
  variables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from mlstore.backends._obstore import (
    NO_RETRIES,
    ObstoreTransport,
    client_options,
    refuse_options,
)
from mlstore.backends.azure import AzureBackend
from mlstore.backends.base import ObjectInfo
from mlstore.backends.gcs import GCSBackend
from mlstore.backends.s3 import S3Backend
from mlstore.errors import ConfigError
from mlstore.url import URL

__all__ = ["FastAzureBackend", "FastGCSBackend", "FastS3Backend"]

_AZURE_SCOPE = "https://storage.azure.com/.default"


class FastS3Backend(ObstoreTransport, S3Backend):
    """``s3://`` with object reads, heads and writes through obstore."""

    def _new_store(self, bucket: str) -> Any:
        from obstore.store import S3Store

        opts = dict(self.options)
        refuse_options("s3", opts, ("profile",))
        client_kwargs = dict(opts.get("client_kwargs") or {})
        endpoint = opts.get("endpoint_url") or client_kwargs.get("endpoint_url")
        region = opts.get("region_name") or client_kwargs.get("region_name")
        config: dict[str, Any] = {}
        if endpoint:
            config["endpoint"] = endpoint
            config["virtual_hosted_style_request"] = False
        if region:
            config["region"] = region
        for ours, theirs in (
            ("key", "access_key_id"),
            ("secret", "secret_access_key"),
            ("token", "session_token"),
        ):
            if opts.get(ours):
                config[theirs] = opts[ours]
        if opts.get("anon"):
            config["skip_signature"] = True
        if opts.get("requester_pays"):
            config["request_payer"] = True
        return S3Store(
            bucket,
            client_options=client_options(self.config, endpoint),
            retry_config=NO_RETRIES,
            **config,
        )


class FastGCSBackend(ObstoreTransport, GCSBackend):
    """``gs://`` with object reads and heads through obstore (writes through gcsfs)."""

    version_field = "version"  # the generation
    pin_field = "version"

    _upload = GCSBackend._upload

    def _new_store(self, bucket: str) -> Any:
        from obstore.store import GCSStore

        opts = dict(self.options)
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        endpoint = opts.get("endpoint_url") or emulator
        if endpoint and "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        token = opts.get("token")
        config: dict[str, Any] = {}
        provider = None
        if endpoint:
            config["base_url"] = endpoint.rstrip("/")
        if opts.get("anon") or token == "anon" or (token is None and emulator):
            config["skip_signature"] = True
        elif isinstance(token, str) and token not in ("google_default", "cloud"):
            config["application_credentials"] = token  # a credentials file
        elif isinstance(token, Mapping):
            config["service_account_key"] = json.dumps(dict(token))
        elif token is not None and hasattr(token, "token"):
            provider = _google_provider(token)
        elif token is not None and token not in ("google_default", "cloud"):
            raise ConfigError(
                "the obstore transport cannot use this gs 'token'; give a credentials "
                "file path, a service-account dict or a google-auth credentials object"
            )
        return GCSStore(
            bucket,
            client_options=client_options(self.config, endpoint),
            retry_config=NO_RETRIES,
            credential_provider=provider,
            **config,
        )


class FastAzureBackend(ObstoreTransport, AzureBackend):
    """``az://`` with object reads, heads and writes through obstore."""

    def _info_of(
        self, url: URL, meta: Mapping[str, Any], attributes: Mapping[str, str]
    ) -> ObjectInfo:
        # ADLS Gen2 / adlfs directory markers: blobs whose metadata names a folder
        lowered = {k.lower(): str(v).lower() for k, v in attributes.items()}
        if lowered.get("hdi_isfolder") == "true" or lowered.get("is_directory") == "true":
            return ObjectInfo(url=url, size=0, type="directory")
        return super()._info_of(url, meta, attributes)

    def _new_store(self, bucket: str) -> Any:
        from obstore.store import AzureStore

        opts = dict(self.options)
        explicit = any(opts.get(k) for k in ("account_key", "sas_token", "credential"))
        conn = opts.get("connection_string")
        if not conn and not explicit:
            conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        parts = _connection_parts(conn) if conn else {}
        config: dict[str, Any] = {}
        name = opts.get("account_name") or parts.get("accountname")
        if name:
            config["account_name"] = name
        key = opts.get("account_key") or parts.get("accountkey")
        sas = opts.get("sas_token") or parts.get("sharedaccesssignature")
        if key:
            config["account_key"] = key
        elif sas:
            config["sas_key"] = str(sas).lstrip("?")
        for option in ("client_id", "client_secret", "tenant_id"):
            if opts.get(option):
                config[option] = opts[option]
        if opts.get("anon"):
            config["skip_signature"] = True
        endpoint = opts.get("endpoint_url") or parts.get("blobendpoint")
        if not endpoint and opts.get("account_host"):
            endpoint = f"https://{opts['account_host']}"
        if endpoint:
            config["endpoint"] = str(endpoint).rstrip("/")
        credential = opts.get("credential")
        provider = _azure_provider(credential) if credential is not None else None
        return AzureStore(
            bucket,
            client_options=client_options(self.config, endpoint),
            retry_config=NO_RETRIES,
            credential_provider=provider,
            **config,
        )


def _connection_parts(conn: str) -> dict[str, str]:
    """An Azure connection string's parts, by lower-cased name."""
    out: dict[str, str] = {}
    for part in str(conn).split(";"):
        name, sep, value = part.partition("=")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _google_provider(credentials: Any) -> Any:
    """obstore's credential provider over a google-auth credentials object (refreshed
    when it has expired)."""

    def provide() -> dict[str, Any]:
        if not getattr(credentials, "valid", True) and hasattr(credentials, "refresh"):
            from google.auth.transport.requests import Request

            credentials.refresh(Request())
        expiry = getattr(credentials, "expiry", None)
        if expiry is not None and expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=timezone.utc)  # google-auth's expiry is UTC
        return {"token": credentials.token, "expires_at": expiry}

    return provide


def _azure_provider(credential: Any) -> Any:
    """obstore's credential provider over an Azure ``TokenCredential``."""
    if not hasattr(credential, "get_token"):
        raise ConfigError("the az option 'credential' must have get_token (azure-identity)")

    def provide() -> dict[str, Any]:
        token = credential.get_token(_AZURE_SCOPE)
        expires = datetime.fromtimestamp(token.expires_on, tz=timezone.utc)
        return {"token": token.token, "expires_at": expires}

    return provide
