"""The read cache: a per-process memory tier over a node-wide disk tier, filled once per
node by single-flight fetches, content-addressed so identical bytes are stored once."""

from mlstore.cache._layout import live_fillers
from mlstore.cache.disk import DiskTier
from mlstore.cache.flight import SingleFlight
from mlstore.cache.memory import MemoryTier
from mlstore.cache.tiered import Fetched, TieredCache

__all__ = ["DiskTier", "Fetched", "MemoryTier", "SingleFlight", "TieredCache", "live_fillers"]
