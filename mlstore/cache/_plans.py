"""Eviction by known future use (Belady), for readers that know their order.

A training job's sampler knows the order in which it will read its samples, this epoch
and often the next (a ``DistributedSampler`` is a function of its seed and epoch). LRU
throws that away: at the end of an epoch it keeps the samples read last, which a
reshuffled next epoch is no likelier to want soon than any others. Belady's rule keeps
instead the samples whose next use comes soonest, and evicts first what will be wanted
last, or never.

A reader shares its order as a *plan*: its position (a count of samples it has
consumed, over all epochs) and, per cached object, the position at which it will next
read it. Both live in the node's index, so a fill in any process evicts by them:

    plans(plan, cursor, seen)   one row per reader: where it is, when it last said so
    uses(plan, key, due)        an entry ``plan`` will read at position ``due``

Eviction order: first the blobs no live plan will read again (by least recent use, as
before), then the planned ones, furthest next use first. A blob wanted by several plans
(the ranks of a node, each with its own sampler, progressing together) counts by its
nearest use. A plan not heard from for :data:`PLAN_LAPSE` seconds is dropped with its
uses, so a finished or killed job leaves nothing that outranks LRU for long.

With no plan on the node the order is plain LRU, by the ``atime`` index.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

__all__ = ["PLAN_LAPSE", "SCHEMA", "PlanCare", "victims"]

#: Seconds after its last report that a plan is forgotten.
PLAN_LAPSE = 600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS plans (
    plan TEXT PRIMARY KEY, cursor INTEGER NOT NULL, seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS uses (
    plan TEXT NOT NULL, key TEXT NOT NULL, due INTEGER NOT NULL, PRIMARY KEY (plan, key));
"""

_BY_AGE = "SELECT hash, size FROM blobs WHERE hash != ? ORDER BY atime"
_BY_PLAN = """
SELECT b.hash, b.size FROM blobs b LEFT JOIN (
    SELECT e.hash AS hash, min(u.due - p.cursor) AS gap
    FROM uses u JOIN plans p ON p.plan = u.plan JOIN entries e ON e.key = u.key
    WHERE u.due >= p.cursor GROUP BY e.hash) n ON n.hash = b.hash
WHERE b.hash != ?
ORDER BY n.gap IS NOT NULL, n.gap DESC, b.atime
"""


def victims(db: sqlite3.Connection, keep: str = "") -> Iterator[tuple[str, int]]:
    """Blobs (hash, size) in the order they should be evicted, ``keep`` excepted
    (inside the caller's transaction)."""
    planned = db.execute("SELECT 1 FROM uses LIMIT 1").fetchone() is not None
    for digest, size in db.execute(_BY_PLAN if planned else _BY_AGE, (keep,)):
        yield str(digest), int(size)


class PlanCare:
    """Plans in the disk tier's index (a mixin of
    :class:`~mlstore.cache.disk.DiskTier`)."""

    clock: Callable[[], float]

    if TYPE_CHECKING:

        def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

        def stored_key(self, key: str) -> str: ...

        def recover(self, exc: BaseException) -> None: ...

    def schedule(self, plan: str, cursor: int, uses: Iterable[tuple[str, int | None]]) -> None:
        """Record that ``plan`` stands at position ``cursor`` and will next read each
        key of ``uses`` at its position (``None``: not again, as far as it knows).
        A key need not be cached yet: the plan holds for it once it is (a reader
        says what it will read before its read fills the cache)."""
        try:
            self._schedule(plan, cursor, [(self.stored_key(k), due) for k, due in uses])
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)  # eviction falls back to what the index holds: still safe

    def _schedule(self, plan: str, cursor: int, rows: list[tuple[str, int | None]]) -> None:
        now = self.clock()
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO plans VALUES (?, ?, ?)", (plan, cursor, now))
            for key, due in rows:
                if due is None:
                    db.execute("DELETE FROM uses WHERE plan = ? AND key = ?", (plan, key))
                else:
                    db.execute("INSERT OR REPLACE INTO uses VALUES (?, ?, ?)", (plan, key, due))
            db.execute("DELETE FROM uses WHERE plan = ? AND due < ?", (plan, cursor))
            old = (now - PLAN_LAPSE,)
            lapsed = [r[0] for r in db.execute("SELECT plan FROM plans WHERE seen < ?", old)]
            for name in lapsed:
                db.execute("DELETE FROM uses WHERE plan = ?", (name,))
                db.execute("DELETE FROM plans WHERE plan = ?", (name,))

    def end_plan(self, plan: str) -> None:
        """Forget ``plan`` and its uses (its reader is done)."""
        try:
            with self._transaction() as db:
                db.execute("DELETE FROM uses WHERE plan = ?", (plan,))
                db.execute("DELETE FROM plans WHERE plan = ?", (plan,))
        except (sqlite3.Error, OSError) as exc:
            self.recover(exc)
