"""``mlstore version`` and ``mlstore doctor``: what is installed, and what is wrong.

``doctor`` runs one check after another and prints one line for each, ``OK``, ``WARN``,
``FAIL`` or ``SKIP`` (a network check under ``--offline``), then a summary; it exits 1
when a check failed. It changes nothing: it builds no :class:`~mlstore.Store` (which
would create and claim the cache directory), it only reads the configuration, the
environment, the cache directory's metadata and ``/proc/mounts``, and opens one TCP
connection per configured endpoint.

Credentials are reported by name and source only (``AWS_SECRET_ACCESS_KEY``,
``options.s3.secret``), never by value; URLs are shown with user info and signatures
masked; error text is scrubbed of every registered credential.

Both commands import no cloud SDK: package versions are read with
:mod:`importlib.metadata`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import IO, Any
from urllib.parse import urlsplit

from mlstore._util.redact import redact_url, register_environment, register_options, scrub
from mlstore._util.units import human_size

__all__ = ["OPTIONAL_PACKAGES", "Check", "run_doctor", "run_version", "version_info"]

#: Packages whose presence changes what mlstore can do, by the extra that installs them.
OPTIONAL_PACKAGES = ("fsspec", "s3fs", "gcsfs", "adlfs", "obstore", "torch", "pyfastcdc")
#: The SDK package each cloud backend needs, and the extra that installs it.
_SDK = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "az": ("adlfs", "azure")}
#: URL schemes of each cloud backend (mount URLs name them).
_SCHEMES = {"s3": ("s3", "s3a"), "gs": ("gs", "gcs"), "az": ("az", "abfs", "abfss")}
#: File systems the cache should not live on: flock and rename are not what it needs
#: across the network, and every read would cross it again.
_NETWORK_FS = {
    *("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph"),
    *("glusterfs", "9p", "afs", "ncpfs", "sshfs", "davfs", "pvfs2", "orangefs"),
}


@dataclass
class Check:
    """One line of ``mlstore doctor``."""

    status: str  # OK, WARN, FAIL or SKIP
    check: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def version_info() -> dict[str, Any]:
    """mlstore's version, Python's, the platform, and the optional packages installed
    (``None`` for one that is not), read from package metadata: nothing is imported."""
    from mlstore import __version__

    return {
        "mlstore": __version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in OPTIONAL_PACKAGES},
    }


def run_version(as_json: bool, out: IO[str]) -> int:
    info = version_info()
    if as_json:
        out.write(json.dumps(info, indent=2) + "\n")
        return 0
    out.write(f"mlstore {info['mlstore']}\n")
    out.write(f"python {info['python']} ({info['implementation']})\n")
    out.write(f"platform {info['platform']}\n")
    for name, version in info["packages"].items():
        out.write(f"{name} {version or '(not installed)'}\n")
    return 0


# ------------------------------------------------------------------------- credentials

_Probe = Callable[[Mapping[str, Any], Mapping[str, str]], tuple[list[str], str | None]]


def _env(*names: str) -> list[str]:
    """``environment NAME`` for each of ``names`` that is set (never its value)."""
    return [f"environment {n}" for n in names if os.environ.get(n)]


def _file(var: str, default: str) -> list[str]:
    """``var`` (when set) or ``default``, if the file exists; its name only."""
    path = os.environ.get(var) or os.path.expanduser(default)
    return [f"file {path}"] if os.path.isfile(path) else []


def _options(
    options: Mapping[str, Any], sources: Mapping[str, str], protocol: str, *names: str
) -> list[str]:
    found = [n for n in names if options.get(n) not in (None, "", False)]
    kwargs = options.get("client_kwargs")
    if isinstance(kwargs, Mapping):
        found += [f"client_kwargs.{n}" for n in names if kwargs.get(n)]
    return [f"options.{protocol}.{n} ({sources.get(n.split('.')[0], 'argument')})" for n in found]


def _s3(options: Mapping[str, Any], sources: Mapping[str, str]) -> tuple[list[str], str | None]:
    if options.get("anon"):
        return [f"anonymous (options.s3.anon, {sources.get('anon', 'argument')})"], None
    found = _options(options, sources, "s3", "key", "secret", "token", "profile")
    found += _options(
        options, sources, "s3", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"
    )
    found += _env(
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    found += _file("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
    found += _file("AWS_CONFIG_FILE", "~/.aws/config")
    return found, "on EC2 or EKS an instance role may still provide them (not checked)"


def _gs(options: Mapping[str, Any], sources: Mapping[str, str]) -> tuple[list[str], str | None]:
    if options.get("token") == "anon" or options.get("anon"):
        return [f"anonymous (options.gs.token, {sources.get('token', 'argument')})"], None
    found = _options(options, sources, "gs", "token", "credentials")
    creds = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if creds:
        state = "" if os.path.isfile(creds) else ", which names a missing file"
        found.append(f"environment GOOGLE_APPLICATION_CREDENTIALS{state}")
    found += _env("GOOGLE_OAUTH_ACCESS_TOKEN")
    gcloud = os.environ.get("CLOUDSDK_CONFIG") or os.path.expanduser("~/.config/gcloud")
    adc = os.path.join(gcloud, "application_default_credentials.json")
    found += [f"file {adc}"] if os.path.isfile(adc) else []
    return found, "on GCE or GKE the metadata server may still provide them (not checked)"


def _az(options: Mapping[str, Any], sources: Mapping[str, str]) -> tuple[list[str], str | None]:
    if options.get("anon"):
        return [f"anonymous (options.az.anon, {sources.get('anon', 'argument')})"], None
    found = _options(
        options, sources, "az", "connection_string", "account_key", "sas_token", "credential"
    )
    found += _env(
        "AZURE_STORAGE_CONNECTION_STRING",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_KEY",
        "AZURE_STORAGE_SAS_TOKEN",
        "AZURE_CLIENT_SECRET",
        "AZURE_FEDERATED_TOKEN_FILE",
    )
    return found, "a managed identity may still provide them (not checked)"


_PROBES: dict[str, _Probe] = {"s3": _s3, "gs": _gs, "az": _az}


def _backend_checks(cfg: Any, origins: Mapping[str, str]) -> Iterator[Check]:
    mounted = {u.split("://", 1)[0] for urls in cfg.mounts.values() for u in urls}
    for protocol, probe in _PROBES.items():
        options = cfg.options.get(protocol, {})
        used = bool(options) or bool(mounted & set(_SCHEMES[protocol]))
        package, extra = _SDK[protocol]
        version = _version(package)
        if version:
            yield Check("OK", f"backend {protocol}", f"{package} {version}")
        elif used:
            yield Check(
                "FAIL",
                f"backend {protocol}",
                f"{package} is not installed but the config uses {protocol}; "
                f"pip install 'mlstore[{extra}]'",
            )
        else:
            yield Check("OK", f"backend {protocol}", f"{package} not installed (not used)")
        prefix = f"options.{protocol}."
        sources = {k[len(prefix) :]: v for k, v in origins.items() if k.startswith(prefix)}
        found, hint = probe(options, sources)
        missing_file = any("missing file" in f for f in found)
        if found:
            status = "FAIL" if missing_file else "OK"
            detail = "yes: " + "; ".join(found)
        else:
            status = "WARN" if used else "OK"
            why = hint if used and hint else f"{protocol} is not used by the config"
            detail = f"none found; {why}"
        yield Check(status, f"credentials {protocol}", detail, {"found": found})


# --------------------------------------------------------------------------- endpoints


def _endpoints(cfg: Any) -> Iterator[tuple[str, str]]:
    """``(label, URL)`` of every endpoint the configuration names."""
    for protocol, options in sorted(cfg.options.items()):
        for key in ("endpoint_url", "account_url"):
            value = options.get(key)
            if isinstance(value, str) and value:
                yield f"{protocol} {key}", value
        conn = options.get("connection_string")
        if isinstance(conn, str):
            for part in conn.split(";"):
                name, _, value = part.partition("=")
                if name.strip() == "BlobEndpoint" and value:
                    yield f"{protocol} BlobEndpoint", value.strip()
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        if os.environ.get(var):
            yield f"s3 {var}", os.environ[var]
    for mount, urls in sorted(cfg.mounts.items()):
        for url in urls:
            if url.startswith(("http://", "https://")):
                yield f"mount {mount}", url


def _reach(url: str, timeout: float) -> tuple[bool, str]:
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        return False, f"not a URL ({exc})"
    if not host:
        return False, "the URL names no host"
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return False, f"cannot connect to {host}:{port} ({reason}, timeout {timeout:g} s)"
    return True, f"{host}:{port} accepts connections ({(time.monotonic() - start) * 1000:.0f} ms)"


def _endpoint_checks(cfg: Any, offline: bool, timeout: float) -> Iterator[Check]:
    for label, url in _endpoints(cfg):
        shown = redact_url(url)
        if offline:
            yield Check("SKIP", f"endpoint {label}", f"{shown}: not checked (--offline)")
            continue
        ok, detail = _reach(url, timeout)
        yield Check("OK" if ok else "FAIL", f"endpoint {label}", f"{shown}: {detail}")


# ------------------------------------------------------------------------------- cache


def _mount_of(path: str, table: str = "/proc/mounts") -> tuple[str, str] | None:
    """``(mount point, file system type)`` holding ``path``, from ``/proc/mounts``."""
    try:
        with open(table, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best: tuple[str, str] | None = None
    real = os.path.realpath(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fields[2])
    return best


def _cache_checks(cfg: Any) -> Iterator[Check]:
    from mlstore.cache import live_fillers

    cache = cfg.cache
    path = cache.resolved_disk_dir
    if not cache.enabled or cache.disk_bytes == 0:
        yield Check("OK", "cache dir", f"{path}: not used (the disk tier is off)")
        return
    if os.path.islink(path):
        yield Check(
            "FAIL", "cache dir", f"{path} is a symbolic link; the cache refuses it: name its target"
        )
        return
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing != path:
        writable = os.access(existing, os.W_OK | os.X_OK)
        yield Check(
            "OK" if writable else "FAIL",
            "cache dir",
            f"{path} does not exist yet; "
            + (
                "it is created (mode 700) on first use"
                if writable
                else f"{existing} is not writable"
            ),
        )
    else:
        yield from _existing_dir_checks(path)
    try:
        free = _free(existing)
    except OSError as exc:
        yield Check("WARN", "cache space", f"cannot read free space ({exc.strerror})")
    else:
        room = f"{human_size(free)} free, disk_bytes {human_size(cache.disk_bytes)}"
        if free < cache.disk_bytes:
            yield Check("WARN", "cache space", f"{room}: fills are skipped once the disk is full")
        else:
            yield Check("OK", "cache space", room)
    mount = _mount_of(existing)
    if mount is None:
        yield Check("OK", "cache filesystem", "unknown (no /proc/mounts)")
    else:
        point, fstype = mount
        network = fstype in _NETWORK_FS or fstype.startswith("fuse.")
        detail = f"{fstype} (mounted on {point})"
        if network:
            detail += ": a network file system; put the cache on a local disk"
        yield Check("WARN" if network else "OK", "cache filesystem", detail, {"type": fstype})
    if existing == path:
        live = live_fillers(path)
        shared = f"{live} fill(s) in progress now" if live is not None else "no fills yet"
        yield Check(
            "OK", "cache sharing", f"{shared}; every mlstore process on this node shares it"
        )


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _existing_dir_checks(path: str) -> Iterator[Check]:
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        yield Check("FAIL", "cache dir", f"{path} is not a directory")
        return
    mode = stat.S_IMODE(st.st_mode)
    data = {"path": path, "uid": st.st_uid, "mode": f"{mode:o}"}
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        yield Check(
            "FAIL",
            "cache dir",
            f"{path} belongs to another user (uid {st.st_uid}); the cache refuses it",
            data,
        )
    elif mode & (stat.S_IWGRP | stat.S_IWOTH):
        yield Check(
            "FAIL",
            "cache dir",
            f"{path} is writable by other users (mode {mode:o}); the cache refuses it: "
            f"run 'chmod 700 {path}'",
            data,
        )
    elif mode & 0o077:
        yield Check(
            "OK", "cache dir", f"{path}, yours, mode {mode:o} (made 700 on first use)", data
        )
    else:
        yield Check("OK", "cache dir", f"{path}, yours, mode {mode:o}", data)


# ------------------------------------------------------------------------------ doctor


def _config_checks(state: dict[str, Any]) -> Iterator[Check]:
    from mlstore.cli import _shown
    from mlstore.config import StoreConfig, explain
    from mlstore.errors import MlstoreError

    register_environment()  # so scrub() masks them, should any text quote one
    try:
        cfg = StoreConfig()
        register_options(cfg.options)
        origins = explain(cfg)
    except MlstoreError as exc:
        yield Check("FAIL", "config", scrub(str(exc)))
        return
    state["config"] = cfg
    state["origins"] = {o.name: o.source for o in origins}
    state["settings"] = [
        {"name": o.name, "value": _jsonable(_shown(o.value)), "source": o.source} for o in origins
    ]
    path = os.environ.get("MLSTORE_CONFIG")
    changed = [o for o in origins if o.source != "default"]
    yield Check(
        "OK",
        "config",
        f"{'config file ' + path if path else 'no config file (MLSTORE_CONFIG unset)'}; "
        f"{len(changed)} setting(s) not at their default",
    )
    for o in changed:
        value = "(value not shown)" if o.value is None else repr(_shown(o.value))
        yield Check("OK", "setting", f"{o.name} = {value} from {o.source}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def doctor(offline: bool = False, timeout: float = 3.0) -> tuple[list[Check], dict[str, Any]]:
    """Every check, in order, and what the JSON report adds (the settings in force)."""
    info = version_info()
    checks = [
        Check(
            "OK",
            "version",
            f"mlstore {info['mlstore']}, Python {info['python']}, {info['platform']}",
        )
    ]
    state: dict[str, Any] = {}
    checks += _config_checks(state)
    cfg = state.get("config")
    if cfg is not None:
        checks += _backend_checks(cfg, state["origins"])
        checks += _endpoint_checks(cfg, offline, timeout)
        checks += _cache_checks(cfg)
    return checks, {"version": info, "settings": state.get("settings", [])}


def run_doctor(offline: bool, timeout: float, as_json: bool, out: IO[str]) -> int:
    checks, extra = doctor(offline, timeout)
    counts = {s: sum(c.status == s for c in checks) for s in ("OK", "WARN", "FAIL", "SKIP")}
    failed = counts["FAIL"] > 0
    if as_json:
        report = {
            "ok": not failed,
            "summary": counts,
            "checks": [asdict(c) for c in checks],
            **extra,
        }
        out.write(scrub(json.dumps(report, indent=2, default=repr)) + "\n")
    else:
        width = max(len(c.check) for c in checks)
        for c in checks:
            out.write(scrub(f"{c.status:<4}  {c.check:<{width}}  {c.detail}") + "\n")
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        verdict = "problems found" if failed else "no problems found"
        out.write(f"doctor: {verdict} ({summary})\n")
    return 1 if failed else 0
