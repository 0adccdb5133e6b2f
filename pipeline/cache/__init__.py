"""The teacher cache: manifest, format, writer, reader (`open_cache`), checks, `kdpipe cache` commands."""

from kdpipe.cache.format import CachedExample, Targets
from kdpipe.cache.manifest import FORMAT_VERSION, Manifest, read_manifest
from kdpipe.cache.reader import Cache, RowGroup, open_cache
from kdpipe.cache.sections import SparseMode

__all__ = ["FORMAT_VERSION", "Cache", "CachedExample", "Manifest", "RowGroup", "SparseMode", "Targets",
           "open_cache", "read_manifest"]
