"""Learned whitening of a run's embeddings, fitted on labelled images (the command: `python -m jaxembed.whitening`).

    python -m jaxembed.whitening --workdir runs/omniglot [--images FOLDER] [--dims 64 --shrinkage 1]
    embedder = jaxembed.load("runs/omniglot", whitening="runs/omniglot/whitening.npz")

A classifier's embedding spends many of its dimensions on what varies within a concept (stroke width,
position). Learned whitening (Radenovic et al., 2018, "Fine-tuning CNN image retrieval with no human
annotation", section 3.4; a linear discriminant): subtract the mean, whiten the within-concept covariance
of the fitting images' embeddings, rotate onto the principal axes of what remains (the between-concept
spread, largest first), keep the leading `dims`, and normalise to unit length again. Each covariance is
shrunk towards a multiple of the identity: a few thousand images cannot pin down a several-hundred-dimensional
covariance's small eigenvalues, and whitening divides by them.

By default it is fitted on the images the run trained on (their concepts are what it knows how to tell
apart; held-out images stay unseen); it is meant for concepts never trained on. On Omniglot's unseen
alphabets it raised MAP@R and one-shot accuracy a little (README; experiments/omniglot_whitening.py chose
`dims` and `shrinkage`); on photos it was not measured, so nothing applies it unasked.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jaxembed import fileio, losses

FORMAT = "jaxembed-whitening/1"
# Chosen on Omniglot's validation alphabet (experiments/omniglot_whitening.py): of its grid, the setting whose
# smallest MAP@R gain over five runs is largest.
DIMS, SHRINKAGE = 64, 1.0


def shrunk_covariance(centred: np.ndarray, shrinkage: float) -> np.ndarray:
    """The covariance of the rows of `centred` plus `shrinkage` times its mean eigenvalue on the diagonal."""
    covariance = centred.T @ centred / len(centred)
    return covariance + shrinkage * np.trace(covariance) / len(covariance) * np.eye(len(covariance))


def inverse_sqrt(covariance: np.ndarray) -> np.ndarray:
    """The symmetric P with P.T @ covariance @ P = I."""
    eigenvalues, vectors = np.linalg.eigh(covariance)
    return vectors / np.sqrt(eigenvalues) @ vectors.T


@dataclasses.dataclass(frozen=True)
class Whitening:
    """`(x - mean) @ projection`, then unit length: `(N, D)` embeddings -> `(N, dims)`.

    Attributes:
      mean: `(D,)`, the fitting embeddings' mean (float64 from `fit`, float32 once saved).
      projection: `(D, dims)`, likewise.
      fitted_on: how the fitted embeddings were made (checkpoint step, embedding_layer, embedding_pooling,
        flip_average, images, dims, shrinkage), checked by `jaxembed.load` against the embeddings it is applied to.
    """

    mean: np.ndarray
    projection: np.ndarray
    fitted_on: dict

    def __call__(self, embeddings):
        """The projected embeddings as unit vectors (a jax array; inside a jit too)."""
        return losses.l2_normalize((embeddings - self.mean) @ self.projection)


def check_concepts(concepts: np.ndarray) -> None:
    """Raises ValueError unless two or more of `concepts` (one per image) have two or more images each:
    fewer leave no within-concept spread to whiten."""
    names, counts = np.unique(np.asarray(concepts), return_counts=True)
    if np.sum(counts >= 2) < 2:
        raise ValueError(f"whitening needs two or more concepts with two or more images each "
                         f"(got {len(names)} concepts, {int(np.sum(counts >= 2))} with two or more images)")


def check_dims(dims: int | None, dim: int) -> None:
    """Raises ValueError unless `dims` (None: all) can be kept of a `dim`-dimensional embedding."""
    if dims is not None and not 1 <= dims <= dim:
        raise ValueError(f"--dims {dims}: must be between 1 and the embedding's dimension {dim}")


def fit(embeddings: np.ndarray, concepts: np.ndarray, *, dims: int | None = DIMS, shrinkage: float = SHRINKAGE,
        **fitted_on) -> Whitening:
    """The learned whitening of `embeddings` (rows) labelled `concepts`, computed in float64.

    With shrinkage 0, `(embeddings - mean) @ projection` has identity within-concept covariance and
    uncorrelated columns, largest variance first; `dims` keeps the leading ones (None: all).

    Raises:
      ValueError: fewer than two concepts with two or more images, or `dims` above the embedding's.
    """
    features = np.asarray(embeddings, np.float64)
    check_concepts(concepts)
    names, index = np.unique(np.asarray(concepts), return_inverse=True)
    check_dims(dims, features.shape[1])
    mean = features.mean(0)
    centres = np.stack([features[index == i].mean(0) for i in range(len(names))])
    whiten = inverse_sqrt(shrunk_covariance(features - centres[index], shrinkage))
    whitened = (features - mean) @ whiten
    variances, axes = np.linalg.eigh(whitened.T @ whitened / len(whitened))
    axes = axes[:, np.argsort(variances)[::-1][:dims]]
    return Whitening(mean, whiten @ axes,
                     {**fitted_on, "dims": axes.shape[1], "shrinkage": shrinkage, "concepts": len(names),
                      "images": len(features)})


def save(whitening: Whitening, path: str) -> None:
    """Writes `path` (.npz) atomically: a crash never leaves half a file under the real name."""
    with fileio.atomic_file(path) as f:
        np.savez(f, format=FORMAT, mean=np.float32(whitening.mean), projection=np.float32(whitening.projection),
                 fitted_on=json.dumps(whitening.fitted_on))


def load(path: str) -> Whitening:
    """The whitening `save` wrote to `path`.

    Raises:
      FileNotFoundError: naming `path`.
      ValueError: naming `path` when it is not such a file.
    """
    try:
        with np.load(path) as saved:
            if str(saved.get("format")) != FORMAT:
                raise ValueError(f"{path}: not a whitening written by python -m jaxembed.whitening (format "
                                 f"{saved.get('format')!s}, expected {FORMAT})")
            # Files written before flip averaging existed were fitted without it.
            fitted_on = {"flip_average": False, **json.loads(str(saved["fitted_on"]))}
            return Whitening(saved["mean"], saved["projection"], fitted_on)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such whitening file (write one with python -m jaxembed.whitening)") from None
    except (OSError, KeyError, EOFError) as error:
        raise ValueError(f"{path}: not a whitening written by python -m jaxembed.whitening ({error})") from None
