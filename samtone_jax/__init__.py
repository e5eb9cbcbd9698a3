"""samtone_jax: dual-encoder retrievers with SamToNe (same tower negatives) in JAX/Flax."""

__version__ = "0.1.0"
