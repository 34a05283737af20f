"""Serve a trained embedder without its model code: `jax.export` (StableHLO) plus its variables.

    export_embedder(jaxembed.load("runs/inception_bn"), "exported/")   # writes the artefact
    embed = load_exported("exported/")                                  # needs only jax and numpy
    vectors = embed(images)          # uint8 (B, S, S, 3) -> float32 (B, D) unit vectors

    python -m jaxembed.export --workdir DIR --out PATH [--batch_size N]

The artefact is a directory:

- `embed.stablehlo`: the serialised `jax.export.Exported` of `embed_fn(leaves, images)`, lowered for
  CPU, CUDA and TPU, with a symbolic batch dimension `b` (or a fixed one with `--batch_size`);
- `variables.npz`: the variables' leaves that the embedding reads, `leaf_0000, leaf_0001, ...` in the
  order the function takes them (classifier weights and ArcFace class centres are left out);
- `meta.json`: image size, embedding size, batch size (null = any), concepts, template config, and each
  stored leaf's tree path, shape and dtype (for people and for bfloat16; loading relies on the order).

This module imports nothing of jaxembed at load time, so `load_exported` runs where only jax and numpy
are installed (copy this file, or `pip install jaxembed` without using its models).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")  # lowered for all, so an artefact made on a laptop serves on accelerators
_FUNCTION_FILE, _VARIABLES_FILE, _META_FILE = "embed.stablehlo", "variables.npz", "meta.json"


def export_embedder(embedder, path: str, *, batch_size: int | None = None,
                    platforms: tuple[str, ...] = PLATFORMS) -> str:
    """Writes `embedder.embed_fn` and its variables as a self-contained directory at `path`.

    Args:
      embedder: a `jaxembed.embed.Embedder` (e.g. `jaxembed.load(workdir)`).
      path: the directory to write (created; files in it are overwritten).
      batch_size: None for a symbolic batch dimension (any batch size, one artefact); an int fixes it
        (then `load_exported`'s function pads and splits batches to that size).
      platforms: the platforms to lower for.

    Returns:
      `path`.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (or None for any batch size)")
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(embedder.variables)
    names = [jax.tree_util.keystr(key) for key, _ in leaves_with_paths]
    specs = [jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype) for _, leaf in leaves_with_paths]
    size = embedder.image_size

    def export(kept: list[int], batch, platforms) -> jax.export.Exported:
        def embed_kept(kept_leaves, images):
            # Zeros stand in for the leaves the embedding never reads; the compiler drops them.
            full = [jnp.zeros(spec.shape, spec.dtype) for spec in specs]
            for i, leaf in zip(kept, kept_leaves, strict=True):
                full[i] = leaf
            return embedder.embed_fn(jax.tree.unflatten(treedef, full), images)

        images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
        return jax.export.export(jax.jit(embed_kept), platforms=platforms)([specs[i] for i in kept], images)

    # A first lowering finds the leaves the embedding uses: classifier weights and ArcFace class centres
    # (possibly most of the bytes, with many classes) are left out of the artefact.
    probe = export(list(range(len(specs))), 1, None)
    kept = [i for i in probe.module_kept_var_idx if i < len(specs)]  # the images argument comes last
    batch = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
    exported = export(kept, batch, platforms)
    leaves = [np.asarray(leaves_with_paths[i][1]) for i in kept]

    from jaxembed import fileio  # here, not at the top: the loader below must run without jaxembed

    os.makedirs(path, exist_ok=True)
    # meta.json is written last and says the artefact is whole: an older one goes first, so a crash while
    # overwriting an artefact leaves one that fails to load, not a new function under old metadata.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, _META_FILE))
    fileio.write_bytes(os.path.join(path, _FUNCTION_FILE), exported.serialize())
    # npz has no bfloat16: such leaves are stored as raw 16-bit words and re-viewed on load.
    with fileio.atomic_file(os.path.join(path, _VARIABLES_FILE)) as f:
        np.savez(f, **{f"leaf_{i:04d}": _storable(leaf) for i, leaf in enumerate(leaves)})
    meta = {
        "format_version": FORMAT_VERSION,
        "image_size": size,
        "embedding_size": int(exported.out_avals[0].shape[-1]),
        "batch_size": batch_size,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "concepts": list(embedder.concepts),
        "config": embedder.config.to_dict(),
        "flip_average": embedder.flip_average,  # each call then runs the model on twice the images
        "leaves": [{"path": names[i], "shape": list(specs[i].shape), "dtype": str(specs[i].dtype)} for i in kept],
        "left_out": [names[i] for i in range(len(specs)) if i not in set(kept)],
    }
    fileio.write_json(os.path.join(path, _META_FILE), meta)
    return path


def _storable(leaf: np.ndarray) -> np.ndarray:
    return leaf.view(np.uint16) if leaf.dtype == jnp.bfloat16 else leaf


def load_exported(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """The embedding function of an artefact `export_embedder` wrote; needs only jax and numpy.

    Returns:
      `embed(images) -> embeddings`: `images` uint8 `(B, S, S, 3)` RGB at the artefact's image size S
      (already resized and centre-cropped, e.g. by `Embedder.preprocess`), `embeddings` float32
      `(B, D)` unit vectors (NumPy). The function's `meta` attribute holds `meta.json`.
    """
    meta_path = os.path.join(path, _META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: {path} is not a whole export_embedder artefact "
                                "(meta.json is written last; an export cut short leaves none)")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    with open(os.path.join(path, _FUNCTION_FILE), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(path, _VARIABLES_FILE)) as saved:
        leaves = [saved[f"leaf_{i:04d}"].view(jnp.dtype(spec["dtype"])) for i, spec in enumerate(meta["leaves"])]
    leaves = jax.device_put(leaves)  # once, not on every call
    call = jax.jit(exported.call)
    size, fixed = meta["image_size"], meta["batch_size"]

    def embed(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"expected uint8 images of shape (B, {size}, {size}, 3), got "
                             f"{images.dtype} {images.shape}")
        if fixed is None:
            return np.asarray(call(leaves, images))
        parts = []
        for start in range(0, len(images), fixed):
            chunk = images[start:start + fixed]
            padded = np.zeros((fixed, *chunk.shape[1:]), np.uint8)  # the artefact takes exactly `fixed`
            padded[:len(chunk)] = chunk
            parts.append(np.asarray(call(leaves, padded))[:len(chunk)])
        if not parts:
            return np.zeros((0, meta["embedding_size"]), np.float32)
        return np.concatenate(parts)

    embed.meta = meta
    return embed
