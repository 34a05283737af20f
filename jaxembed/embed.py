"""The functional embed API (`jaxembed.load`) and `python -m jaxembed.embed`.

    embedder = jaxembed.load("runs/inception_bn")
    vectors = embedder(images)                        # uint8 HxWx3 arrays -> (N, D) unit vectors
    jax.jit(embedder.embed_fn)(embedder.variables, x) # the pure function, inside your own jit

    python -m jaxembed.embed --workdir DIR --images FOLDER --out FILE.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxembed import data as data_lib
from jaxembed import templates

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
    """

    embed_fn: Callable[[Any, jax.Array], jax.Array]
    variables: Any
    config: templates.Config
    concepts: tuple[str, ...]
    apply_fn: Callable[[Any, jax.Array], dict]
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

    def predict(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Concept probabilities `(N, num_concepts)`: sigmoid (logreg=1) or softmax (logreg=0)."""
        if self.config.template.head != "classifier":
            raise ValueError(f"template {self.config.template.name!r} has no classifier; use the embeddings")
        logits = self._outputs(images)["logits"]
        return np.asarray(jax.nn.sigmoid(logits) if self.config.logreg else jax.nn.softmax(logits, axis=-1))


def load(workdir: str, *, step: int | None = None) -> Embedder:
    """The embedder of the run in `workdir`, from its newest checkpoint (or `step`)."""
    from jaxembed import train  # the model builder lives with the trainer

    run_path = os.path.join(workdir, "run.json")
    if not os.path.exists(run_path):
        raise FileNotFoundError(f"{run_path} not found: {workdir!r} is not a jaxembed training workdir")
    with open(run_path) as f:
        record = json.load(f)
    config_values = dict(record["config"])
    template = templates.get(config_values.pop("template"))
    config = template.config(**config_values)
    concepts = tuple(record["concepts"])
    options = record.get("options", {})
    model = train.build_model(config, len(concepts), dtype=train.DTYPES[options.get("dtype", "float32")])

    checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
    with ocp.CheckpointManager(checkpoints, item_handlers=ocp.StandardCheckpointHandler()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpoints}")
        # The saved TrainState restores as a tree of arrays; only params and batch_stats are kept.
        # Restore onto one local device whatever device layout (hosts, devices) wrote the checkpoint.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              manager.item_metadata(step))
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    params = restored["params"]
    if "centers" in params:  # ArcFace: a model-parallel run pads its centres (train.padded_class_count)
        params = {**params, "centers": params["centers"][:, :len(concepts)]}
    variables = jax.tree.map(jnp.asarray, {"params": params, "batch_stats": restored["batch_stats"]})

    @jax.jit  # compiled once per Embedder and image batch shape; still usable inside the caller's jit
    def apply_fn(variables, images):
        return model.apply(variables, images, train=False)

    def embed_fn(variables, images):
        return model.apply(variables, images, train=False)["embedding"]

    return Embedder(embed_fn=embed_fn, variables=variables, config=config, concepts=concepts, apply_fn=apply_fn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxembed.embed", description="Embed a folder of images.")
    parser.add_argument("--workdir", required=True, help="a training workdir")
    parser.add_argument("--images", required=True, help="a folder of images (concept sub-folders give labels)")
    parser.add_argument("--out", required=True, help="the .npz file to write")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        embedder = load(args.workdir)
        images = data_lib.load_source(args.images)
    except (FileNotFoundError, ValueError) as error:
        print(f"jaxembed.embed: error: {error}", file=sys.stderr)
        return 1
    embedder = dataclasses.replace(embedder, batch_size=args.batch_size)
    from tqdm.auto import tqdm

    paths, vectors, labels = [], [], []
    for batch in tqdm(data_lib.eval_batches(images, image_size=embedder.image_size, batch_size=args.batch_size),
                      desc="embed", unit="batch", total=-(-len(images) // args.batch_size)):
        real = batch["mask"].astype(bool)
        out = embedder.apply_fn(embedder.variables, batch["image"])
        vectors.append(np.asarray(out["embedding"])[real])
        for index in batch["index"][real]:
            paths.append(images.item_names[index])
            labels.append(images.concepts[images.labels[index][0]])
    for bad in images.bad_files:
        log.warning("skipped %s: %s", bad.path, bad.reason)
    np.savez(args.out, paths=np.asarray(paths), embeddings=np.concatenate(vectors), labels=np.asarray(labels))
    print(f"wrote {len(paths)} embeddings to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
