"""The teacher cache: format, writer, reader (`open_cache`) and tools (info, verify, merge)."""

from kdpipe.cache.format import FORMAT_VERSION, CachedExample, Targets, read_manifest
from kdpipe.cache.reader import Cache, open_cache

__all__ = ["FORMAT_VERSION", "Cache", "CachedExample", "Targets", "open_cache", "read_manifest"]
