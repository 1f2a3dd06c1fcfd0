"""fer_jax: fast, reproducible facial-expression recognition training in JAX/Flax."""
