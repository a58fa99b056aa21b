"""The frozen-prefix cache: the cache itself (:mod:`.cache`), the sample index it keys on (:mod:`.index`),
where cached outputs are kept (:mod:`.store`) and which phases use it (:mod:`.phases`)."""

from phasetune.features.prefix_cache.cache import PrefixCache, find_prefix_end
from phasetune.features.prefix_cache.index import IndexedCollate, IndexedDataset
from phasetune.features.prefix_cache.phases import PrefixCachePhases

__all__ = ["IndexedCollate", "IndexedDataset", "PrefixCache", "PrefixCachePhases", "find_prefix_end"]
