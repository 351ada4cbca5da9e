"""Storage backends: one module per kind of storage, imported on first use."""

from mlstore.backends.base import Backend, ObjectInfo, get_backend_class, register_backend

__all__ = ["Backend", "ObjectInfo", "get_backend_class", "register_backend"]
