"""Retrieval evaluation: trec_eval-equal metrics, exact top-k search, corpus encoding, protocols."""
