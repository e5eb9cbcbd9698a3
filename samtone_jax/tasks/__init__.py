"""seqio tasks, mixtures, evaluation sets and the dual-encoder feature converter (data only)."""
