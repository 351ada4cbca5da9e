"""PyTorch integration: datasets that read through a :class:`~mlstore.Store`.

Importing this package imports torch (``pip install mlstore[torch]``); ``import
mlstore`` never does.
"""

from __future__ import annotations

from mlstore.torch._shards import ShardDataset, ShardFormatError

__all__ = ["ShardDataset", "ShardFormatError"]
