"""Serving a trained run: `load`/`Embedder` (embed.py), the learned whitening (whitening.py), and the
export to StableHLO plus variables (export.py). Nothing here imports the trainer.

Imports nothing at load time: `jaxembed.inference.export.load_exported` runs where only jax and numpy are
installed, and the command line reads `EMBEDDING_SETTINGS` without loading a model.
"""

# `jaxembed.load`'s keywords (and the tools' flags) that choose how a run's embedding is read: a classifier's
# from another block or pooling, a learned whitening fitted on the run's embeddings, and the average with
# each image's mirror image.
EMBEDDING_SETTINGS = ("embedding_layer", "embedding_pooling", "whitening", "flip_average")
