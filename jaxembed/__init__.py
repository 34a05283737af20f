"""jaxembed: visual embedding models in JAX/Flax, trained from templates and served as pure functions."""

__version__ = "0.1.0"
