"""Benchmark tasks run in a fresh process: ``python -m benchmarks.child`` (see
:class:`benchmarks.common.Child`).

Protocol: one JSON task on the first stdin line; the child sets up (imports, client,
a warm-up read), prints ``ready``, waits for ``go`` on stdin, runs the timed part and
prints one JSON line with its results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import current_rss, digest, peak_rss
from benchmarks.peers import make_reader


def _barrier() -> float | None:
    """Say ``ready``, wait for ``go``; returns the start time the parent gave with it
    (see :meth:`benchmarks.common.Child.go`), if any."""
    print("ready", flush=True)
    words = sys.stdin.readline().split()
    if not words or words[0] != "go":
        raise SystemExit("no go")
    return float(words[1]) if len(words) > 1 else None


def read_keys(task: dict[str, Any]) -> dict[str, Any]:
    """Each key read once (``read``) or into one buffer (``readinto``), in this fresh
    process; the warm-up key is read first so client setup is not timed."""
    reader = make_reader(task["spec"])
    paths = [reader.path(k) for k in task["keys"]]
    expected = task["expected"]
    if task.get("warmup"):
        reader.warm_up(reader.path(task["warmup"]))
    _barrier()
    if task["mode"] == "read":
        # Each read timed alone and its bytes hashed outside the timer, then dropped:
        # keeping hundreds of results alive would measure page faults, not reads.
        elapsed, ok, nbytes = 0.0, True, 0
        clock = time.perf_counter
        read = reader.read
        for p, e in zip(paths, expected, strict=True):
            t0 = clock()
            data = read(p)
            elapsed += clock() - t0
            ok = ok and digest(data) == e
            nbytes += len(memoryview(data))
            del data
    else:
        buf = bytearray(task["size"])
        view = memoryview(buf)
        elapsed, ok, nbytes = 0.0, True, 0
        for p, e in zip(paths, expected, strict=True):
            t0 = time.perf_counter()
            n = reader.readinto(p, view)
            elapsed += time.perf_counter() - t0
            ok = ok and digest(view[:n]) == e
            nbytes += n
    reader.close()
    return {"elapsed": elapsed, "ops": len(paths), "bytes": nbytes, "ok": ok}


def many_readers(task: dict[str, Any]) -> dict[str, Any]:
    """One of several processes that read the same keys at the same time (B7)."""
    reader = make_reader(task["spec"])
    paths = [reader.path(k) for k in task["keys"]]
    if task.get("warmup"):
        reader.warm_up(reader.path(task["warmup"]))
    _barrier()
    t0 = time.perf_counter()
    out = reader.read_many(paths)
    elapsed = time.perf_counter() - t0
    bad = sum(digest(b) != e for b, e in zip(out, task["expected"], strict=True))
    reader.close()
    return {"elapsed": elapsed, "ok": bad == 0 and len(out) == len(paths), "bad": bad}


def stream(task: dict[str, Any]) -> dict[str, Any]:
    """Stream one large object in chunks and report the peak RSS (B10)."""
    import xxhash

    reader = make_reader(task["spec"])
    if task.get("warmup"):
        reader.warm_up(reader.path(task["warmup"]))
    baseline = peak_rss()
    baseline_now = current_rss()
    _barrier()
    h = xxhash.xxh3_64()
    n = 0
    t0 = time.perf_counter()
    for piece in reader.stream(reader.path(task["key"]), task["chunk"]):
        h.update(piece)
        n += len(memoryview(piece))
    elapsed = time.perf_counter() - t0
    peak = peak_rss()
    ok = n == task["size"] and h.intdigest() == task["expected"]
    reader.close()
    return {
        "elapsed": elapsed,
        "ok": ok,
        "baseline_peak": baseline,
        "baseline_rss": baseline_now,
        "peak": peak,
    }


def memory_budget(task: dict[str, Any]) -> dict[str, Any]:
    """Read many small objects through a Store with a small memory tier (B10)."""
    reader = make_reader(task["spec"])
    paths = [reader.path(k) for k in task["keys"]]
    if task.get("warmup"):
        reader.warm_up(reader.path(task["warmup"]))
    before = current_rss()
    _barrier()
    ok = True
    sizes = []
    for _ in range(task.get("passes", 1)):
        for p, e in zip(paths, task["expected"], strict=True):
            data = reader.read(p)
            ok = ok and digest(data) == e
            del data  # only the memory tier keeps anything
        sizes.append(reader.store.cache.memory.size())  # type: ignore[attr-defined]
    after = current_rss()
    memory = reader.store.cache.memory  # type: ignore[attr-defined]
    result = {
        "ok": ok,
        "tier_bytes": memory.size(),
        "tier_items": len(memory),
        "tier_max_seen": max(sizes),
        "budget": memory.budget,
        "rss_before": before,
        "rss_after": after,
        "peak": peak_rss(),
    }
    reader.close()
    return result


def window(task: dict[str, Any]) -> dict[str, Any]:
    """One of several processes sharing a node cache (B11): set up, then from the
    start time the parent gives, read (``raw-fill``: write) its keys for ``seconds``,
    in turn (``cycle``) or each at most once.

    Every read's bytes are checked against their xxh3 (a raw fill's, read back after
    the window); a mlstore process also reports its Store's counters over the window
    (disk hits, misses, requests, stale copies served and revalidations; with
    ``settle``, after its background revalidations are done)."""
    kind, keys, expected = task["kind"], task["keys"], task["expected"]
    reader = None
    if kind == "raw-fill":
        src, dest = task["source"], task["dest"]
        blobs = [Path(src, k).read_bytes() for k in keys]
        op = _raw_fill(dest, keys, blobs)
    else:
        reader = make_reader(task["spec"])
        paths = [reader.path(k) for k in keys]
        read = reader.read
        if task.get("warmup"):
            reader.warm_up(reader.path(task["warmup"]))

        def op(i: int) -> bool:
            i %= len(paths)
            return digest(read(paths[i])) == expected[i]

    store = getattr(reader, "store", None)  # a mlstore Store: its counters, too
    if store is not None and task.get("settle"):
        store.cache.settle(60)  # the warm-up's background check is not the window's
    before = store.stats() if store is not None else None
    at = _barrier() or time.time()
    while time.time() < at:
        time.sleep(0.001)
    end = at + task["seconds"]
    cpu0 = time.process_time()
    n, ops, bad = len(keys), 0, 0
    clock = time.time
    while clock() < end and (task["cycle"] or ops < n):
        if not op(ops):
            bad += 1
        ops += 1
    elapsed = clock() - at
    cpu = time.process_time() - cpu0
    out: dict[str, Any] = {"ops": ops, "elapsed": elapsed, "cpu": cpu, "bad": bad}
    if kind == "raw-fill":  # written bytes read back after the window
        out["bad"] = sum(
            digest(Path(dest, "files", f"{i}-{keys[i % n]}").read_bytes()) != expected[i % n]
            for i in range(ops)
        )
    if store is not None and before is not None:
        if task.get("settle"):  # background checks done before counting (not timed)
            out["settled"] = store.cache.settle(60)
        got = store.stats() - before
        out["counts"] = {
            "disk_hits": got.get("hits", "disk"),
            "misses": got.get("misses", "cache"),
            "requests": got["requests"],
            "stale_served": got.get("stale_served", "cache"),
            "revalidations": got.get("revalidations", "cache"),
        }
    if reader is not None:
        reader.close()
    return out


def _raw_fill(dest: str, keys: list[str], blobs: list[bytes]) -> Callable[[int], bool]:
    """The ``i``-th write: the blobs in turn, each time as a new file ``<i>-<key>`` (a
    private temp file, then ``rename`` into place, as a cache fill does)."""
    tmp, files = os.path.join(dest, "tmp"), os.path.join(dest, "files")
    pid = os.getpid()

    def op(i: int) -> bool:
        temp = f"{tmp}/{pid}-{i}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(blobs[i % len(blobs)])
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temp, f"{files}/{i}-{keys[i % len(keys)]}")
        return True

    return op


def dataloader(task: dict[str, Any]) -> dict[str, Any]:
    """DataLoader epochs of one peer (B6): see :func:`benchmarks.dataloader.epochs`."""
    from benchmarks.dataloader import epochs

    return epochs(task, _barrier)


def checkpoint(task: dict[str, Any]) -> dict[str, Any]:
    """One checkpoint save or load of one peer (B14): see :mod:`benchmarks.checkpoint`."""
    from benchmarks.checkpoint import child

    return child(task, _barrier)


def copy(task: dict[str, Any]) -> dict[str, Any]:
    """One recursive copy of one peer (B15): see :mod:`benchmarks.copying`."""
    from benchmarks.copying import child

    return child(task, _barrier)


TASKS = {
    "read_keys": read_keys,
    "many_readers": many_readers,
    "stream": stream,
    "memory_budget": memory_budget,
    "window": window,
    "dataloader": dataloader,
    "checkpoint": checkpoint,
    "copy": copy,
}


def main() -> None:
    task = json.loads(sys.stdin.readline())
    result = TASKS[task["task"]](task)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
