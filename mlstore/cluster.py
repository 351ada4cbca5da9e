"""Node identity and plans: which node of a cluster warms which object.

Every node of a job computes the same plan from the same listing (or manifest) and the
same list of nodes, with no coordinator: :func:`plan` assigns each URL to one node by
rendezvous (highest-random-weight) hashing. For each URL every node gets a weight,
``xxh3_64(node + "\\0" + url)``, and the URL goes to the node with the highest one.
That makes the plan

- the same in every process, on every machine and Python version (xxh3 is a fixed
  function of the bytes; Python's ``hash()`` is salted per process and never used);
- balanced: each node gets about ``1/N`` of the URLs;
- stable when the cluster changes: a node that joins takes about ``1/(N+1)`` of the
  URLs, each from the node that held it, and no URL moves between two nodes that stay;
  a node that leaves hands on only its own URLs.

>>> import mlstore
>>> shares = mlstore.plan([f"s3://bucket/{i}.bin" for i in range(6)], ["a", "b"])
>>> sorted(shares)
['a', 'b']
>>> sorted(shares["a"] + shares["b"]) == sorted(f"s3://bucket/{i}.bin" for i in range(6))
True

A node's name comes from :func:`node_key`. Node names are 1 to 253 characters among
ASCII letters, digits, ``.``, ``_`` and ``-`` (a Kubernetes node name or a host name
fits), and are compared exactly, case included.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mlstore.errors import ConfigError

if TYPE_CHECKING:
    from mlstore.manifest import Manifest

__all__ = ["check_node_name", "node_key", "node_share", "plan"]

#: Where :func:`node_key` looks, first to last.
_SOURCES = ("MLSTORE_NODE_ID", "NODE_NAME")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}")


def check_node_name(name: str, where: str) -> str:
    """Return ``name`` if it can name a node, or raise :class:`ConfigError` naming
    ``where`` the value came from."""
    if not _NAME.fullmatch(name):
        problem = "is longer than 253 characters" if len(name) > 253 else "is not a node name"
        raise ConfigError(
            f"{where}: {name[:60]!r} {problem}: use 1 to 253 ASCII letters, digits, "
            "'.', '_' or '-' (no '/', no whitespace)"
        )
    return name


def node_key() -> str:
    """The name of this node, as :func:`plan` knows it.

    The first non-empty one of: the ``MLSTORE_NODE_ID`` environment variable, ``NODE_NAME``
    (set from the Kubernetes downward API, ``spec.nodeName``), and the host name.

    Raises:
        ConfigError: the value found is not a node name (see the module docstring); the
            message names the variable it came from.
    """
    for var in _SOURCES:
        value = os.environ.get(var, "")
        if value:
            return check_node_name(value, f"environment variable {var}")
    import socket  # here: `import mlstore` stays light

    return check_node_name(socket.gethostname(), "the host name (socket.gethostname())")


def _nodes(nodes: Iterable[str]) -> list[str]:
    names = list(nodes)
    if not names:
        raise ConfigError("nodes: the list of nodes is empty; name at least one node")
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise ConfigError(f"nodes[{i}]: a node name is a string, got {name!r}")
        check_node_name(name, f"nodes[{i}]")
        if name in seen:
            raise ConfigError(f"nodes[{i}]: node {name!r} is listed twice; name each node once")
        seen.add(name)
    return names


def _urls(urls: Iterable[str] | Manifest) -> list[str]:
    if isinstance(urls, str):
        raise ConfigError("urls: give a list of URLs (or a Manifest), not one string")
    return [u if isinstance(u, str) else str(u.url) for u in urls]


def plan(urls: Iterable[str] | Manifest, nodes: Iterable[str]) -> dict[str, list[str]]:
    """Assign each URL to exactly one of ``nodes`` by rendezvous hashing.

    Args:
        urls: the URLs, or a :class:`~mlstore.Manifest` (its entries' URLs are used).
        nodes: the names of every node (each once; see :func:`node_key`).

    Returns:
        Each node's URLs, in the order they were given; every node is a key, even one
        that gets no URL. It costs one xxh3 of each URL per node.

    Raises:
        ConfigError: ``nodes`` is empty, names a node twice or holds a value that is not
            a node name; or ``urls`` is a single string.
    """
    import xxhash

    names = _nodes(nodes)
    shares: dict[str, list[str]] = {name: [] for name in names}
    prefixes = [(name.encode() + b"\0", name) for name in names]
    weight = xxhash.xxh3_64_intdigest
    for url in _urls(urls):
        tail = url.encode()
        # The heaviest node; on a tie of weights (1 in 2**64), the greater name.
        _, owner = max((weight(prefix + tail), name) for prefix, name in prefixes)
        shares[owner].append(url)
    return shares


def node_share(urls: Iterable[str] | Manifest, node: str, nodes: Iterable[str]) -> list[str]:
    """The URLs :func:`plan` gives to ``node``, in the order they were given.

    Raises:
        ConfigError: ``node`` is not one of ``nodes``, or as :func:`plan` does.
    """
    names = _nodes(nodes)
    if node not in names:
        raise ConfigError(
            f"node: {node[:60]!r} is not one of the {len(names)} nodes listed; "
            "add it to the list or pick a listed node"
        )
    return plan(urls, names)[node]
