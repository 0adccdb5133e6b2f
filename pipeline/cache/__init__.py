"""The teacher cache: manifest, format, writer, reader (`open_cache`) and tools (info, verify, merge)."""

from kdpipe.cache.format import FORMAT_VERSION, CachedExample, Targets
from kdpipe.cache.manifest import Manifest, SparseMode, read_manifest
from kdpipe.cache.reader import Cache, RowGroup, open_cache

__all__ = ["FORMAT_VERSION", "Cache", "CachedExample", "Manifest", "RowGroup", "SparseMode", "Targets",
           "open_cache", "read_manifest"]
