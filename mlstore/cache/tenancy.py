"""A node cache shared by tenants of different users, and the one budget they share.

On Kubernetes, pods of different jobs and users mount the same hostPath as the node's
cache. Under ``CacheConfig.tenancy`` (``uid`` or ``namespace``) each tenant's disk tier
lives in a directory of its own::

    <disk_dir>/                  world-traversable (0755), any owner
      tenants/                   1777, like /tmp: any uid makes its own directory here,
                                 and none can remove or rename another's
        uid-1001/                0700, owned by uid 1001: a whole disk tier (marker,
                                 index, blobs, tmp, locks, meta, node stats)
        uid-1001.usage           the ledger: the bytes uid-1001 holds, one number,
                                 0644, owned by uid 1001 (no URL, key or secret)

The OS keeps tenants apart: a tenant cannot open another's files, and mlstore looks
for an entry only in its own tenant's index, so it never serves one a tenant did not
fetch itself (two tenants reading the same object each make their own GET).

**One budget.** ``disk_bytes`` is the node's budget for all tenants together. Every
reservation of a fill first records the tenant's usage with the fill counted (blobs
plus reservations) in its ledger file, then reads the others' files, and evicts the
tenant's own least recently used blobs down to its cap:
``disk_bytes - (the others' recorded bytes)``. Recording before reading means that of
two tenants filling at once, at least the later one sees the other's fill: the sum
stays within the budget without a lock shared across users (which any user could hold
forever). The recorded usage is corrected after every fill and eviction.

**The floor.** A tenant may always hold ``disk_bytes / (8 x tenants)``, even when the
others' recorded bytes leave it less: a node filled by one idle tenant then still
caches for the next one. The node can then hold more than its budget, by at most that
floor per tenant, until the big tenant's next fill evicts it down to its own (smaller)
cap, or the node's ``mlstore cache prune`` run as root (the DaemonSet,
``mlstore cache serve --prune-every``) cuts every tenant to its fair share: equal
shares of the budget, a tenant using less than its share leaving the rest to the
others (max-min fair). Root prunes each tenant as that tenant's uid, in a process of
its own, so every file in a tenant's directory stays its owner's.

In-flight fills are never taken for dead ones: a fill is known to be alive by the
``flock`` on its temp file (see ``_layout.py``), which holds across the PID namespaces
of containers, and each tenant only ever cleans its own directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import stat
import sys
from typing import Any

from mlstore.cache.disk import DiskTier
from mlstore.config import CacheConfig
from mlstore.errors import ConfigError

__all__ = [
    "Ledger",
    "TenantDiskTier",
    "disk_tier_class",
    "fair_shares",
    "prepare_tenants_dir",
    "prune_tenants",
    "prunes_every_tenant",
    "tenant_root",
]

log = logging.getLogger("mlstore.cache")

#: A tenant may always hold ``budget / (_FLOOR_SHARE x tenants)`` (see the module doc).
_FLOOR_SHARE = 8
_USAGE = ".usage"
_TENANT_DIR = re.compile(r"(?:uid-\d+|ns-[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)")
#: What root runs, as a tenant's uid, to prune that tenant (``-c``: no second copy of
#: this module as ``__main__``).
_PRUNE_ONE = (
    "import json, sys; from mlstore.cache.tenancy import _prune_one; "
    "print(json.dumps(_prune_one(sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'all')))"
)
_HELD = """SELECT (SELECT value FROM meta WHERE name = 'bytes'),
                  (SELECT coalesce(sum(size), 0) FROM reservations)"""


def tenant_root(config: CacheConfig) -> str:
    """The disk tier's directory for ``config``; under a tenancy, the shared ``tenants/``
    directory is made (or checked) first, so that the tenant can make its own in it."""
    if config.tenant is not None:
        prepare_tenants_dir(config.tenants_dir)
    return config.resolved_disk_dir


def disk_tier_class(config: CacheConfig) -> type[DiskTier]:
    """The disk tier for ``config``: one that shares the node's budget under a tenancy."""
    return DiskTier if config.tenant is None else TenantDiskTier


def prepare_tenants_dir(tenants: str) -> None:
    """Make the node cache directory (0755) and its ``tenants/`` (1777) if missing. An
    existing ``tenants/`` that others may write to must have the sticky bit (else any
    user could remove another's directory)."""
    node_dir = os.path.dirname(tenants)
    with contextlib.suppress(OSError):  # its parents (~/.cache); a failure is told below
        os.makedirs(os.path.dirname(node_dir), exist_ok=True)
    for path, mode in ((node_dir, 0o755), (tenants, 0o1777)):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(
                f"cannot create the node cache directory {path!r} ({exc.strerror}); make it "
                f"once as root with 'mkdir -p -m 1777 {tenants}'"
            ) from None
        else:
            os.chmod(path, mode)  # the umask took bits off
    st = os.lstat(tenants)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{tenants!r} is not a directory (a symbolic link?); remove it")
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o1777:
        os.chmod(tenants, 0o1777)  # ours, made by a plain mkdir (a checkpoint's staging)
        st = os.lstat(tenants)
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{tenants!r} is writable by everyone without the sticky bit, so any user "
            f"could remove another's cache: run 'chmod 1777 {tenants}'"
        )


class Ledger:
    """The bytes each tenant of the node holds: one small file per tenant in
    ``tenants/``, written by that tenant only (the sticky bit keeps the others off it)."""

    def __init__(self, tenants_dir: str, name: str) -> None:
        self.dir = tenants_dir
        self.name = name
        self._warned = False

    def publish(self, held: int) -> None:
        """Record that this tenant holds ``held`` bytes."""
        path = os.path.join(self.dir, self.name + _USAGE)
        text = f"{held}\n".encode()
        with contextlib.suppress(OSError), open(path, "rb") as fh:
            if fh.read(32) == text:
                return  # recorded already: no rewrite of the file per fill
        temp = os.path.join(self.dir, f".{self.name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, text)
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            self.failed(exc)

    def failed(self, exc: Exception) -> None:
        """Log, once, that this tenant's usage could not be recorded (reads go on; the
        others then see its last recorded bytes)."""
        if not self._warned:
            self._warned = True
            log.warning("cannot record the cache usage of tenant %s: %s", self.name, exc)

    def usage(self) -> dict[str, int]:
        """The recorded bytes of every tenant whose directory exists, this one included.
        A file not owned by its tenant's owner (or root), or unreadable, counts as 0."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return {}
        found: dict[str, int] = {}
        for name in names:
            if not _TENANT_DIR.fullmatch(name):
                continue
            try:
                owner = os.lstat(os.path.join(self.dir, name))
                fd = os.open(
                    os.path.join(self.dir, name + _USAGE),
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                )
            except OSError:
                found[name] = 0
                continue
            try:
                ok = os.fstat(fd).st_uid in (owner.st_uid, 0) and stat.S_ISDIR(owner.st_mode)
                text = os.read(fd, 32).decode("ascii", "replace").strip()
            except OSError:
                ok, text = False, ""
            finally:
                os.close(fd)
            found[name] = int(text) if ok and text.isdigit() else 0
        return found

    def cap(self, budget: int) -> int:
        """This tenant's cap: ``budget`` less the others' recorded bytes, never below
        the floor of ``budget / (8 x tenants)``."""
        usage = self.usage()
        usage.pop(self.name, None)
        floor = budget // (_FLOOR_SHARE * (len(usage) + 1))
        return max(budget - sum(usage.values()), floor)


class TenantDiskTier(DiskTier):
    """A tenant's disk tier: :class:`DiskTier` whose budget is its share of the node's
    (``budget`` reads as this tenant's cap; the node's budget is :attr:`node_budget`)."""

    def __init__(self, root: str, budget: int, **kwargs: Any) -> None:
        root = os.path.abspath(root)
        self.ledger = Ledger(os.path.dirname(root), os.path.basename(root))
        self.node_budget = budget
        super().__init__(root, budget, **kwargs)
        self.publish()

    @property
    def budget(self) -> int:
        """This tenant's cap within the node's budget, from the ledger as it is now."""
        return self.ledger.cap(self.node_budget)

    @budget.setter
    def budget(self, value: int) -> None:
        self.node_budget = value

    def _cap(self, held: int) -> int:
        # Inside the reservation's transaction: recorded first, then the others read.
        self.ledger.publish(held)
        return self.ledger.cap(self.node_budget)

    def publish(self) -> None:
        """Record the bytes this tenant holds now (blobs plus fills in progress, and
        its other files under ``disk_cap="all"``), in a transaction of its index, so
        that its processes record in their true order."""
        try:
            with self._transaction() as db:
                indexed, reserved = (int(n) for n in db.execute(_HELD).fetchone())
                self.ledger.publish(indexed + reserved + self.overhead())
        except (sqlite3.Error, OSError) as exc:  # never fails a read: the ledger is advice
            self.ledger.failed(exc)

    def put(self, *args: Any, **kwargs: Any) -> bool:
        try:
            return super().put(*args, **kwargs)
        finally:
            self.publish()

    def evict(self, to_bytes: int | None = None, keep: str | None = None) -> int:
        freed = super().evict(to_bytes, keep)
        if freed:
            self.publish()
        return freed

    def drop_blob(self, digest: str) -> None:
        super().drop_blob(digest)
        self.publish()


def fair_shares(usage: dict[str, int], limit: int) -> dict[str, int]:
    """The most each tenant may keep so that the sum is at most ``limit``: equal
    shares, with what a tenant leaves of its share going to the others (max-min fair).

    >>> fair_shares({"a": 10, "b": 70, "c": 40}, 90)
    {'a': 10, 'b': 40, 'c': 40}
    """
    caps: dict[str, int] = {}
    left = limit
    pending = sorted(usage, key=lambda name: usage[name])
    while pending:
        share = left // len(pending)
        name = pending[0]
        if usage[name] <= share:
            caps[name] = usage[name]
            left -= usage[name]
            pending.pop(0)
            continue
        for name in pending:  # every remaining tenant uses more than an equal share
            caps[name] = share
        break
    return {name: caps[name] for name in usage}


def prunes_every_tenant(config: CacheConfig) -> bool:
    """Whether ``mlstore cache prune`` and ``serve`` prune every tenant of the node (run
    as root under a tenancy, as a node's DaemonSet is) rather than their own cache."""
    return config.tenant is not None and os.geteuid() == 0


def prune_tenants(tenants: str, limit: int, caps_all: bool = False) -> list[dict[str, Any]]:
    """Cut every tenant in ``tenants`` (a node cache's ``tenants/``) to its fair share
    of ``limit`` (run as root; one process per tenant, as that tenant's uid), its index
    and metadata files counted with ``caps_all``. One report per tenant pruned:
    ``tenant``, ``before``, ``after``, ``freed``, ``evicted``."""
    import subprocess  # only root's prune starts processes: not at import

    usage = Ledger(tenants, "").usage()
    if sum(usage.values()) <= limit:
        return []
    reports = []
    for name, cap in fair_shares(usage, limit).items():
        if usage[name] <= cap:
            continue
        owner = os.lstat(os.path.join(tenants, name))
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _PRUNE_ONE,
                os.path.join(tenants, name),
                str(cap),
                "all" if caps_all else "blobs",
            ],
            user=owner.st_uid,
            group=owner.st_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            log.warning("pruning cache tenant %s failed: %s", name, done.stderr.strip()[-500:])
            continue
        reports.append({"tenant": name, **json.loads(done.stdout)})
    return reports


def _prune_one(root: str, cap: int, caps_all: bool = False) -> dict[str, int]:
    """Evict the tenant cache ``root`` down to ``cap`` bytes (run as its owner)."""
    if not os.path.isdir(root):  # removed meanwhile: not to be made again here
        return {"before": 0, "after": 0, "freed": 0, "evicted": 0}
    disk = TenantDiskTier(root, cap, caps_all=caps_all)
    try:
        before, blobs = disk.size(), disk.count()
        freed = disk.evict(cap)
        return {
            "before": before,
            "after": disk.size(),
            "freed": freed,
            "evicted": blobs - disk.count(),
        }
    finally:
        disk.close()
