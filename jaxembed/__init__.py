"""jaxembed: visual embedding models in JAX/Flax, trained from templates and served as pure functions."""

__version__ = "0.1.0"


def load(workdir: str, *, step: int | None = None, **embedding):
    """The `Embedder` of a training workdir (see `jaxembed.inference.embed.load`; `embedding_layer=`,
    `embedding_pooling=` read a classifier's embedding from another block; `whitening=` a file
    `python -m jaxembed.whitening` fitted projects it)."""
    from jaxembed.inference.embed import load as _load  # imported on use: it pulls in TensorFlow for decoding

    return _load(workdir, step=step, **embedding)
