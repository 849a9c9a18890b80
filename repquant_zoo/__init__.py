"""Demo models and datasets for repquant-jax's examples, tests and experiments.

Not part of the library: `repquant_jax` never imports this package.
"""
