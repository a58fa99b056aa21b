"""What a run can switch on besides the schedule itself: the phase audit (:mod:`.audit`), the frozen-prefix
cache (:mod:`.prefix_cache`), snapshots of the best weights (:mod:`.snapshots`), random state for exact
resumes (:mod:`.random_state`), ``torch.compile`` support (:mod:`.compile_support`) and peak memory
(:mod:`.peak_memory`). Torch only; imports :mod:`phasetune.sharding`, :mod:`phasetune.core` and below."""
