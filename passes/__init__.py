"""Graph passes: capture, channel grouping, compaction."""
