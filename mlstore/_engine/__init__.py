"""The request engine under the :class:`~mlstore.store.Store` facade.

The facade parses a URL and resolves its mount once, then hands the result (a
:class:`~mlstore._engine.replicas.Resolved`) down to one of these modules; nothing here
imports the facade, and calls only go down::

    store.py      the facade: parse once, resolve once, pick the path, delegate
      runtime.py    one process's engine: wires the parts below together
      cached.py     the cached read path (TieredCache), handed a Reader
      writer.py     write, open for write, rm, copy; cache coherence after each
      listing.py    ls, find, glob, and mount-relative names
      reader.py     locate, whole fetch, range and pinned reads, resume
      replicas.py   mounts, the failover sweep and its circuit breaker
      calls.py      per-process backends; one counted call under the retry policy
    backends/     one kind of storage each; know no cache, retry or Store
"""
