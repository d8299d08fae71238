"""ddrop_jax package."""
