"""repquant-jax: post-training quantization of transformers in JAX with RepQuant."""

from repquant_jax.inspect import inspect

__all__ = ["inspect"]
__version__ = "0.1.0.dev0"
