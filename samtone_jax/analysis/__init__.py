"""Embedding-space analysis of trained dual encoders (t-SNE maps, top-1 distance distributions)."""
