"""The layer rule, checked on the package's own imports.

mlstore is built in layers and calls only go down (see the ``mlstore._engine`` module
docstring)::

    consumers   mlstore (the package), fsspec, cli, __main__   public API of the Store
    facade      store
    engine      _engine.*                                     never imports the facade
    parts       cache.*  |  backends.*  |  retry              never import each other
    settings    config(.*), metrics
    leaves      url, hashing, errors, _util.*

A module may import modules of its own layer or below, never above; the three parts of
the middle layer know nothing of each other (the cache is handed a reader, backends know
no cache or retry, the retry layer wraps calls it is handed). A private module (one whose
name starts with ``_``) is imported only from inside its own package, except the shared
leaves in ``_util`` and the engine, which only the facade may use.

Every ``import`` counts: inside functions, and under ``if TYPE_CHECKING:`` too, since a
type-only import upward is how a cycle starts.
"""

from __future__ import annotations

import ast
import pathlib

import mlstore

PACKAGE = pathlib.Path(mlstore.__file__).parent

#: Layer of each top-level part of the package (higher imports lower).
LAYERS: dict[str, int] = {
    "_util": 0,
    "errors": 0,
    "url": 1,
    "hashing": 1,
    "metrics": 2,  # its node totals default to the configured cache directory
    "config": 2,
    "cost": 2,  # prices (a table read through config) applied to a Stats snapshot
    "cache": 3,
    "backends": 3,
    "retry": 3,
    "_engine": 4,
    "store": 5,
    "fsspec": 6,
    "_bulk": 5,  # the Store's bulk reads and warms (a mixin of store)
    "_peer": 5,  # objects handed between nodes' caches: records out, verified records in
    "_display": 5,  # the Store's repr and notebook view (called by store)
    "manifest": 6,  # recorded versions, read through a Store
    "cluster": 6,  # node identity and rendezvous plans (of URLs or a Manifest)
    "torch": 6,  # PyTorch datasets and checkpoints over the public API
    "checkpoint": 6,  # checkpoints (chunks, manifests, retention) over the public API
    "_manifest_io": 6,
    "cli": 6,
    "cli_doctor": 6,  # mlstore version and mlstore doctor
    "cli_inspect": 6,  # mlstore stat and mlstore du
    "cli_sync": 6,  # mlstore cp and mlstore sync
    "cli_warm": 6,  # mlstore warm
    "cli_cluster": 6,  # mlstore warm --ray and --dask
    "cli_cache": 6,  # mlstore cache path|prune|clear|verify|scrub
    "cli_config": 6,  # mlstore config
    "cli_stats": 6,  # mlstore cache stats
    "cli_serve": 6,  # mlstore cache serve
    "dask": 6,  # the Dask worker plugin and node warm-ups, over the CLI's warm
    "ray": 6,  # Ray node warm-ups and the filesystem for Ray Data
    "_nodewarm": 6,  # the warm task and report the Dask and Ray integrations share
    "cli_demo": 6,  # mlstore demo
    "demo": 6,  # the demo's servers and contenders, over the public API
    "notebook": 6,  # notebook helpers: short mlstore tracebacks in IPython
    "__main__": 6,
    "": 6,  # mlstore/__init__.py
}
#: Parts of one layer that must not import each other.
SIBLINGS = {"cache", "backends", "retry"}
#: Private packages other parts may import, and who may.
SHARED_PRIVATE = {"_util": None, "_engine": {"store", "_bulk", "_engine", "_peer"}}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path, name: str) -> set[str]:
    """Every mlstore module ``path`` imports (absolute names), wherever the import is."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mlstore")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "mlstore":
                continue
            # "from mlstore.cache import disk" names a module; "from mlstore.url import
            # URL" names something in one.
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.add(candidate if _exists(candidate) else module)
    return found


def _exists(module: str) -> bool:
    rel = pathlib.Path(*module.split(".")[1:])
    base = PACKAGE / rel
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def package_graph() -> dict[str, set[str]]:
    return {
        module_name(path): imports_of(path, module_name(path))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def part(module: str) -> str:
    """The top-level part of the package a module belongs to (``""`` for the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import in ``graph`` that breaks the layer rule, as readable lines."""
    out = []
    for importer, imported in sorted(graph.items()):
        here = part(importer)
        if here not in LAYERS:
            out.append(f"{importer}: not in any layer; add it to LAYERS in this test")
            continue
        for target in sorted(imported):
            there = part(target)
            if there not in LAYERS:
                out.append(f"{importer} imports {target}: not in any layer")
            elif LAYERS[there] > LAYERS[here]:
                out.append(f"{importer} imports {target}: a layer above it")
            elif here != there and {here, there} <= SIBLINGS:
                out.append(
                    f"{importer} imports {target}: parts of one layer know nothing of each other"
                )
            else:
                problem = _private(importer, target)
                if problem:
                    out.append(f"{importer} imports {target}: {problem}")
    return out


def _private(importer: str, target: str) -> str | None:
    parts = target.split(".")
    for depth, piece in enumerate(parts[1:], start=1):
        if not piece.startswith("_") or piece.startswith("__"):
            continue
        owner = ".".join(parts[:depth])  # the package the private module belongs to
        if depth == 1 and piece in SHARED_PRIVATE:
            allowed = SHARED_PRIVATE[piece]
            if allowed is not None and part(importer) not in allowed:
                return f"only {sorted(allowed)} may use {owner}.{piece}"
            continue
        if importer != owner and not importer.startswith(owner + "."):
            return f"{owner}.{piece} is private to {owner}"
    return None


def test_the_package_keeps_its_layers() -> None:
    graph = package_graph()
    assert "mlstore._engine.cached" in graph and "mlstore.store" in graph  # the walk saw them
    assert violations(graph) == []


def test_nothing_below_the_facade_imports_it() -> None:
    graph = package_graph()
    importers = {m for m, imported in graph.items() if "mlstore.store" in imported}
    consumers = {"mlstore", "mlstore.fsspec", "mlstore.cli", "mlstore.manifest"}
    assert {
        m
        for m in importers
        if not m.startswith(("mlstore.torch.", "mlstore.checkpoint.", "mlstore.cli_"))
    } <= consumers


def test_the_check_fails_when_the_cache_climbs_back_into_the_store() -> None:
    # The cycle this rule exists to prevent: the cached read path calling the Store.
    graph = package_graph()
    graph["mlstore._engine.cached"] = graph["mlstore._engine.cached"] | {"mlstore.store"}
    assert violations(graph) == ["mlstore._engine.cached imports mlstore.store: a layer above it"]


def test_the_check_catches_siblings_and_private_modules() -> None:
    graph = {
        "mlstore.cache.tiered": {"mlstore.backends.base"},
        "mlstore.backends.s3": {"mlstore.retry"},
        "mlstore.fsspec": {"mlstore._engine.runtime"},
        "mlstore.cache.disk": {"mlstore.backends._fsspec"},
        "mlstore.backends.gcs": {"mlstore.backends._fsspec", "mlstore._util.redact"},
    }
    found = violations(graph)
    assert found == [
        "mlstore.backends.s3 imports mlstore.retry: parts of one layer know nothing of each other",
        "mlstore.cache.disk imports mlstore.backends._fsspec: parts of one layer know nothing "
        "of each other",
        "mlstore.cache.tiered imports mlstore.backends.base: parts of one layer know nothing "
        "of each other",
        "mlstore.fsspec imports mlstore._engine.runtime: only ['_bulk', '_engine', '_peer', "
        "'store'] "
        "may use "
        "mlstore._engine",
    ]


def test_relative_imports_are_resolved(tmp_path: pathlib.Path) -> None:
    # The package uses absolute imports today; a relative one must not slip past.
    fake = tmp_path / "x.py"
    fake.write_text("from ..store import Store\nfrom . import disk\n")
    found = imports_of(fake, "mlstore.cache.x")
    assert found == {"mlstore.store", "mlstore.cache.disk"}
    assert violations({"mlstore.cache.x": found}) == [
        "mlstore.cache.x imports mlstore.store: a layer above it"
    ]
