"""dsp_jax package."""
