"""Private implementation of repquant-jax; the public API is `repquant_jax`."""
