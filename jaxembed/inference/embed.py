"""The functional embed API (`jaxembed.load`); its command is `python -m jaxembed.embed` (`jaxembed.cli.embed`).

    embedder = jaxembed.load("runs/inception_bn")
    vectors = embedder(images)                        # uint8 HxWx3 arrays -> (N, D) unit vectors
    jax.jit(embedder.embed_fn)(embedder.variables, x) # the pure function, inside your own jit

    python -m jaxembed.embed --workdir DIR --images FOLDER --out FILE.npz
        [--embedding_layer inception_4c --embedding_pooling gem]   # a classifier run read from another block
        [--whitening WORKDIR/whitening.npz]                        # projected by a learned whitening
        [--flip_average]                                           # averaged with the mirror image's
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxembed import data as data_lib
from jaxembed import losses, parallel, rundir, tasks, templates
from jaxembed.inference import EMBEDDING_SETTINGS
from jaxembed.inference import whitening as whitening_lib

log = logging.getLogger("jaxembed.embed")


@dataclasses.dataclass(frozen=True)
class Embedder:
    """A trained model as a pure function plus its variables.

    Attributes:
      embed_fn: `(variables, images) -> embeddings`, pure and jit-able: `images` uint8 (or float in
        [0, 255]) `(B, image_size, image_size, 3)` RGB, `embeddings` float32 `(B, D)` unit vectors.
      variables: `{"params": ..., "batch_stats": ...}` for `embed_fn`.
      config: the template configuration it was trained with.
      concepts: concept names, index -> name.
      apply_fn: `(variables, images) -> outputs dict` (`embedding`, and `logits` for classifiers).
      step: the checkpoint step the variables come from.
      whitening: the learned whitening applied to the embeddings (`jaxembed.whitening`), or None.
      flip_average: whether each image's outputs are averaged with its mirror image's (`flip_averaged`).
    """

    embed_fn: Callable[[Any, jax.Array], jax.Array]
    variables: Any
    config: templates.Config
    concepts: tuple[str, ...]
    apply_fn: Callable[[Any, jax.Array], dict]
    step: int | None = None
    whitening: whitening_lib.Whitening | None = None
    flip_average: bool = False
    batch_size: int = 64

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def preprocess(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """uint8 HxWx3 (or HxW) images of any size, one or a list/batch -> `(N, S, S, 3)` uint8."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]
        return np.stack([data_lib.preprocess_for_eval(np.asarray(image), self.image_size) for image in images])

    def _outputs(self, images) -> dict[str, np.ndarray]:
        batch = self.preprocess(images)
        parts = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), chunk.dtype)  # one compiled shape
            padded[:len(chunk)] = chunk
            outputs = self.apply_fn(self.variables, padded)
            parts.append({k: np.asarray(v)[:len(chunk)] for k, v in outputs.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised float32 embeddings `(N, D)` of uint8 images (one HxWx3 array, a list or a batch)."""
        return self._outputs(images)["embedding"]

    @property
    def embedding_dim(self) -> int:
        """D, the embeddings' dimension (from the traced shapes: nothing is computed)."""
        return embedding_dim(self.embed_fn, self.variables, self.image_size)

    @property
    def task(self) -> tasks.Task:
        return tasks.for_config(self.config)

    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Concept probabilities `(N, num_concepts)`: sigmoid (logreg=1) or softmax (logreg=0)."""
        if isinstance(self.task, tasks.ArcFace):
            raise ValueError(f"template {self.config.template.name!r} has no classifier; use the embeddings")
        return self.task.predict(self._outputs(images))


# The settings that choose a classifier's embedding without changing its parameters (`models.taps`);
# spelled in `cli`, which the command-line tools import without the model code.
# Those that no run has of its own (applied to a model's outputs, not read from its config), with the
# value that applies nothing.
APPLIED_TO_OUTPUTS = {"whitening": None, "flip_average": False}


def embedding_dim(embed_fn: Callable, variables, image_size: int) -> int:
    """The dimension of `embed_fn(variables, images)`'s embeddings, from `jax.eval_shape`."""
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
    return jax.eval_shape(embed_fn, variables, image).shape[-1]


def embedding_changes(config: templates.Config, embedding: dict[str, Any]) -> dict[str, Any]:
    """The settings of `embedding` that differ from the run's own (`config`): those that change its embedding
    (`whitening` and `flip_average`, which no run has of its own, whenever they apply something)."""
    return {name: value for name, value in embedding.items()
            if value != APPLIED_TO_OUTPUTS.get(name, getattr(config, name, None))}


def embedding_of(config: templates.Config, *, flip_average: bool) -> dict[str, Any]:
    """How embeddings read with `config` and `flip_average` are made, as a whitening records and `load` checks
    it: the config's embedding settings (`embedding_layer` None: the last block) and `flip_average`."""
    return {**{name: getattr(config, name) for name in EMBEDDING_SETTINGS if name not in APPLIED_TO_OUTPUTS},
            "flip_average": flip_average}


def flip_averaged(apply_fn: Callable[[jax.Array], dict], images: jax.Array) -> dict:
    """`apply_fn`'s outputs for `images` (B, H, W, C) averaged with those for their mirror images (the width
    reversed), from one call on the 2B images; the averaged embedding is scaled back to unit length.

    Test-time flip averaging, as ArcFace's face verification does it: a model trained with random flips
    (`--flip`) sees an image and its mirror as the same concept, and their average embedding is steadier
    than either. The unit embeddings are averaged, not the features before normalisation, so both views
    weigh the same. Wrong for subjects whose mirror image is another concept (digits, letters)."""
    count = images.shape[0]
    both = apply_fn(jnp.concatenate([images, images[:, :, ::-1]]))
    averaged = {name: (value[:count] + value[count:]) / 2 for name, value in both.items()}
    return {**averaged, "embedding": losses.l2_normalize(averaged["embedding"])}


def load(workdir: str, *, step: int | None = None, **embedding: Any) -> Embedder:
    """The embedder of the run in `workdir`, from its newest checkpoint (or `step`).

    `embedding`: `embedding_layer=` and/or `embedding_pooling=` to embed from another block than the
    run was trained with (they change no parameter, so any finished classifier run can be read so); a
    setting equal to the run's own changes nothing. `whitening=` a file `python -m jaxembed.whitening`
    fitted on this run's embeddings (same checkpoint, block, pooling and flip_average): the embeddings are
    projected by it. `flip_average=True`: each image's outputs (embedding, logits) are averaged with its
    mirror image's (`flip_averaged`), at twice the compute.
    Reads the run through `jaxembed.rundir.RunDir` without locking it: safe while the run trains.
    """
    unknown = sorted(set(embedding) - set(EMBEDDING_SETTINGS))
    if unknown:
        raise TypeError(f"load() got {', '.join(unknown)}; it takes {', '.join(EMBEDDING_SETTINGS)}")
    whitening_path = embedding.pop("whitening", None)
    flip_average = embedding.pop("flip_average", False)
    if not isinstance(flip_average, bool):  # bool("false") would silently be True
        raise TypeError(f"load() got flip_average={flip_average!r}; it takes True or False")
    run = rundir.RunDir(workdir)
    config, concepts = run.config(), run.concepts()
    embedding = embedding_changes(config, embedding)
    if embedding and config.embedding_neck != "none":
        raise ValueError(f"{workdir}: embedding_neck={config.embedding_neck!r} keeps a running mean of the run's "
                         f"own embedding, so another embedding_layer or embedding_pooling cannot be read from it")
    config = config.replace(**embedding)
    variables, step = run.variables(step)
    # The checkpoint's ArcFace centres lost their model-parallel padding: build the model unpadded.
    model = tasks.build_model(config.replace(model_parallelism=1), len(concepts))
    variables = jax.tree.map(jnp.asarray, variables)
    whitening = None
    if whitening_path is not None:
        dim = embedding_dim(lambda v, x: model.apply(v, x, train=False)["embedding"], variables, config.image_size)
        whitening = matching_whitening(whitening_path, workdir, step=step, dim=dim,
                                       **embedding_of(config, flip_average=flip_average))

    def outputs_fn(variables, images):
        def apply_fn(images):
            return model.apply(variables, images, train=False)

        outputs = flip_averaged(apply_fn, images) if flip_average else apply_fn(images)
        return outputs if whitening is None else {**outputs, "embedding": whitening(outputs["embedding"])}

    def embed_fn(variables, images):
        return outputs_fn(variables, images)["embedding"]

    # apply_fn is compiled once per Embedder and image batch shape; still usable inside the caller's jit.
    return Embedder(embed_fn=embed_fn, variables=variables, config=config, concepts=concepts,
                    apply_fn=jax.jit(outputs_fn), step=step, whitening=whitening, flip_average=flip_average)


def matching_whitening(path: str, workdir: str, *, dim: int, **expected: Any) -> whitening_lib.Whitening:
    """The whitening in `path`, checked to have been fitted on the embeddings `workdir` now gives (`expected`:
    checkpoint step and embedding settings; `dim`: their dimension).

    Raises:
      ValueError: naming `path`, what it was fitted on, and how to fit it again.
    """
    whitening = whitening_lib.load(path)
    differ = [f"{name} {whitening.fitted_on.get(name)!r} (now {value!r})" for name, value in expected.items()
              if whitening.fitted_on.get(name) != value]
    if whitening.mean.shape != (dim,):
        differ.append(f"dimension {whitening.mean.shape[0]} (now {dim})")
    if differ:
        raise ValueError(f"{path} was fitted on other embeddings than {workdir} gives: {'; '.join(differ)}; fit it "
                         f"again: python -m jaxembed.whitening --workdir {workdir}, with the same --embedding_layer, "
                         f"--embedding_pooling and --flip_average")
    return whitening


def embed_dataset(apply_fn: Callable, variables, images, *, image_size: int, batch_size: int = 64,
                  mesh: Mesh | None = None, progress: bool = False,
                  keep: Sequence[str] = ("embedding", "logits")) -> dict[str, np.ndarray]:
    """Eval-mode outputs for every item of `images`: the one way a data set is embedded.

    Args:
      apply_fn: `(variables, images uint8 (B, S, S, 3)) -> {"embedding": ..., "logits"?: ...}`, e.g. an
        `Embedder`'s `apply_fn` or the trainer's compiled eval step.
      variables: its variables.
      images: a `jaxembed.data.LabelledImages`.
      image_size: the side S the images are centre-cropped to.
      batch_size: images per call, across all devices (rounded up to a multiple of their count); the
        last batch is padded, so one shape is compiled.
      mesh: with a device mesh (`jaxembed.parallel.make_mesh`), each process loads its share of every
        batch, the batch is split over all devices, and every process gets all the outputs.
      keep: the outputs of `apply_fn` to collect (those it returns).

    Returns:
      `embedding` float32 `(N, D)` unit vectors, `logits` `(N, C)` for classifiers, and `index` int64
      `(N,)`, each row's position in `images`, ascending; an image that fails to decode is left out.
    """
    processes, process = jax.process_count(), jax.process_index()
    if mesh is not None:
        batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    parts: dict[str, list[np.ndarray]] = {}
    batches = data_lib.eval_batches(images, image_size=image_size, batch_size=batch_size // processes,
                                    process_index=process, process_count=processes)
    for batch in tqdm(batches, desc="embed", unit="batch", total=-(-len(images) // batch_size),
                      disable=not progress or process != 0):
        pixels = batch["image"] if mesh is None else parallel.global_batch({"image": batch["image"]}, mesh)["image"]
        outputs = {k: v for k, v in apply_fn(variables, pixels).items() if k in keep}
        rows = {"mask": batch["mask"], "index": batch["index"].astype(np.int64)}
        if processes > 1:  # global outputs and each process's own rows, gathered in the same process order
            outputs = multihost_utils.process_allgather(outputs, tiled=True)
            rows = multihost_utils.process_allgather(rows, tiled=True)
        for name, value in {**outputs, **rows}.items():
            parts.setdefault(name, []).append(np.asarray(value))
    joined = {name: np.concatenate(value) for name, value in parts.items()}
    real = joined.pop("mask").astype(bool)
    order = np.argsort(joined["index"][real], kind="stable")
    return {name: value[real][order] for name, value in joined.items()}
