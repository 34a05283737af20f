"""Pretrained weights: PyTorch state dicts -> jaxembed's Flax variables.

`load_pretrained(arch, path)` reads a state dict and returns the variables of
`jaxembed.models.create(arch, num_classes=...)`:

  * resnet50/101/152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d:
    torchvision's state dicts (names mapped as in `resnet.py`'s docstring,
    e.g. `layer2.0.downsample.1.running_var` ->
    batch_stats/stage2_block0/downsample_bn/var);
  * inception_bn: the state dict of the common BN-Inception port (Cadene's
    `pretrainedmodels` `bninception`, e.g. `inception_3a_1x1_bn.weight` ->
    params/inception_3a/1x1/bn/scale; see `inception_bn.py`).

Layouts: conv weights OIHW -> HWIO (grouped: (O, I/groups, kh, kw) ->
(kh, kw, I/groups, O)); linear weights (out, in) -> (in, out); BatchNorm
weight/bias -> params scale/bias, running_mean/running_var -> batch_stats
mean/var. `num_batches_tracked` is ignored. A vector stored as a (1, C) row is
accepted as (C,) (Cadene's bn_inception-52deb4733.pth stores some that way).
Everything is float32.

Files: `.safetensors` is read with the `safetensors` package (no torch
needed); any other suffix (`.pth`, `.pt`, `.bin`) with `torch.load(...,
weights_only=True)`. `python -m jaxembed.convert_weights IN.pth` converts
once where torch is installed.

Preprocessing: torchvision's weights expect what `heads.normalize_images`
gives (RGB, ImageNet mean/std). The BN-Inception port's weights expect BGR
pixels in [0, 255] minus (104, 117, 128); they load all the same, but their
first layer then sees differently scaled, channel-swapped input until
fine-tuning (or a preprocessing change) adapts it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxembed import models

# How many names each part of a mismatch error lists before "... and N more".
_MAX_LISTED = 20

# (collection, Flax leaf name) -> torch parameter/buffer name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}

_RESNET_TOP = {"stem_conv": "conv1", "stem_bn": "bn1", "classifier": "fc"}
_RESNET_LAYER = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def _resnet_module(path: tuple[str, ...]) -> str:
    """Flax module path -> torchvision module name, e.g.
    ("stage2_block0", "downsample_bn") -> "layer2.0.downsample.1", ("stem_conv",) -> "conv1"."""
    if len(path) == 1:
        return _RESNET_TOP[path[0]]
    block, layer = path
    stage, index = re.fullmatch(r"stage(\d+)_block(\d+)", block).groups()
    return f"layer{stage}.{index}.{_RESNET_LAYER.get(layer, layer)}"


def _inception_module(path: tuple[str, ...]) -> str:
    """Flax module path -> port module name: names joined by "_", a trailing "conv" dropped, e.g.
    ("inception_3a", "1x1", "conv") -> "inception_3a_1x1", ("inception_3a", "1x1", "bn") -> "inception_3a_1x1_bn"."""
    if path[-1] == "conv":
        path = path[:-1]
    return "_".join(path)


def _naming(arch: str) -> tuple[Any, str]:
    """(Flax module path -> torch module name, torch name of the classifier) for `arch`."""
    if arch == "inception_bn":
        return _inception_module, "last_linear"
    return _resnet_module, "fc"


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the torch tensor that maps onto a Flax leaf of `flax_shape`."""
    if len(flax_shape) == 4:  # conv HWIO <- OIHW
        kh, kw, i, o = flax_shape
        return (o, i, kh, kw)
    if len(flax_shape) == 2:  # dense (in, out) <- (out, in)
        return flax_shape[::-1]
    return tuple(flax_shape)


def _to_flax_layout(value: np.ndarray) -> np.ndarray:
    """A torch-layout array (already checked against `_torch_shape`) in Flax layout."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # (O, I/groups, kh, kw) -> (kh, kw, I/groups, O)
    if value.ndim == 2:
        return value.T
    return value


def _key_map(arch: str, num_classes: int | None) -> dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """torch key -> (Flax path (collection, *modules, leaf), the Flax leaf's shape/dtype)."""
    module = models.create(arch, num_classes=num_classes)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), images)
    module_name, _ = _naming(arch)
    keys = {}
    for flax_path, leaf in traverse_util.flatten_dict(abstract).items():
        collection, *modules, leaf_name = flax_path
        keys[f"{module_name(tuple(modules))}.{_LEAF_NAMES[collection, leaf_name]}"] = (flax_path, leaf)
    return keys


def state_dict_shapes(arch: str, *, num_classes: int | None = None) -> dict[str, tuple[int, ...]]:
    """The keys and torch-layout shapes a state dict for `arch` must have (no `num_batches_tracked`)."""
    return {key: _torch_shape(leaf.shape) for key, (_, leaf) in _key_map(arch, num_classes).items()}


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"\n  {title} ({len(items)}):" + "".join(f"\n    {item}" for item in shown) + more


def _mismatch_error(what: str, missing: list[str], unexpected: list[str], mis_shaped: list[str]) -> ValueError:
    message = what
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
        if items:
            message += _listing(title, items)
    return ValueError(message)


def variables_from_state_dict(
    arch: str, state_dict: Mapping[str, Any], *, num_classes: int | None = None
) -> dict[str, dict]:
    """Maps a torch-layout state dict onto the variables of `create(arch, num_classes=num_classes)`.

    state_dict: name -> array-like (NumPy arrays, or CPU torch tensors), as in the module docstring.
    num_classes: None for the backbone alone; the classifier's keys (`fc.*` or
      `last_linear.*`) are then dropped silently. Otherwise they must be present
      with (num_classes, feature_dim) / (num_classes,) shapes.

    Returns {"params": ..., "batch_stats": ...} of float32 jax arrays.
    Raises ValueError listing the missing, unexpected and mis-shaped keys with their shapes
    (the first 20 of each, then how many more).
    """
    _, classifier = _naming(arch)
    remaining = dict(state_dict)
    flat, missing, mis_shaped = {}, [], []
    for key, (flax_path, leaf) in _key_map(arch, num_classes).items():
        expected = _torch_shape(leaf.shape)
        if key not in remaining:
            missing.append(f"{key} {expected}")
            continue
        value = np.asarray(remaining.pop(key))
        if len(expected) == 1 and value.shape == (1, *expected):
            value = value[0]
        if value.shape != expected:
            mis_shaped.append(f"{key}: got {value.shape}, expected {expected}")
            continue
        flat[flax_path] = jnp.asarray(_to_flax_layout(value), dtype=leaf.dtype)

    def ignored(key: str) -> bool:
        return key.endswith(".num_batches_tracked") or (num_classes is None and key.startswith(f"{classifier}."))

    unexpected = [f"{key} {tuple(np.shape(value))}" for key, value in remaining.items() if not ignored(key)]
    if missing or unexpected or mis_shaped:
        raise _mismatch_error(
            f"the state dict does not match jaxembed's {arch} (num_classes={num_classes}):",
            missing, unexpected, mis_shaped,
        )
    return traverse_util.unflatten_dict(flat)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state dict as name -> NumPy array.

    `.safetensors` needs the `safetensors` package; anything else is read with
    torch (`weights_only=True`: no code in the file runs). A checkpoint that
    wraps its weights as {"state_dict": ...} is unwrapped, and the "module."
    prefix that (Distributed)DataParallel adds is removed.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        return load_file(path)

    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading {path} needs torch; without torch, convert it once where torch is installed "
            f"(python -m jaxembed.convert_weights {path}) and load the .safetensors file"
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}

    def to_numpy(tensor) -> np.ndarray:
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor = tensor.float()  # bfloat16 (which NumPy lacks), float16, float64 -> float32
        return tensor.numpy()

    return {key: to_numpy(value) for key, value in state.items()}


def load_pretrained(arch: str, path: str | os.PathLike, *, num_classes: int | None = None) -> dict[str, dict]:
    """Variables of `jaxembed.models.create(arch, num_classes=num_classes)` from a PyTorch state dict file.

    arch: a name in `jaxembed.models.ARCHS`.
    path: a torchvision (ResNet/ResNeXt) or BN-Inception-port state dict, as
      `.safetensors` (no torch needed) or `.pth` (needs torch).
    num_classes: None (default) for the backbone alone, returning pooled
      features; the file's classifier (`fc`/`last_linear`) is then dropped
      silently. Set it to the file's class count (1000 for ImageNet) to keep it.

    Returns {"params": ..., "batch_stats": ...}, float32 jax arrays, for
    `module.apply(variables, images, train=False)`.
    Raises ValueError listing the missing, unexpected and mis-shaped keys with their shapes
    (the first 20 of each, then how many more).

    Example:
      variables = load_pretrained("resnet50", "resnet50-11ad3fa6.safetensors", num_classes=1000)
      logits = create("resnet50", num_classes=1000).apply(variables, images)  # (B, 1000)
    """
    return variables_from_state_dict(arch, read_state_dict(path), num_classes=num_classes)


def _like(value, template_leaf) -> Any:
    """`value` with the template leaf's dtype, and its sharding when the template is a jax.Array."""
    value = np.asarray(value, dtype=template_leaf.dtype)
    if isinstance(template_leaf, jax.Array):
        # make_array_from_callback also builds arrays sharded over other hosts' devices.
        return jax.make_array_from_callback(value.shape, template_leaf.sharding, lambda index: value[index])
    return jnp.asarray(value)


def merge_backbone(
    variables: Mapping[str, Any], pretrained_backbone_variables: Mapping[str, Any], *, name: str = "backbone"
) -> dict[str, Any]:
    """Replaces the `name` subtree of a template model's variables with pretrained backbone variables.

    variables: the template model's variables ({"params": {"backbone": ..., <head>...}, "batch_stats": ...}),
      e.g. from `ClassifierModel(...).init(...)` or a train state's params/batch_stats.
    pretrained_backbone_variables: variables of `create(arch)` without a classifier, e.g.
      `load_pretrained(arch, path)`.

    Returns new variables: every backbone leaf replaced (in the template leaf's dtype and, for
    jax.Array leaves, its sharding), everything else (the head) unchanged. Inputs are not modified.
    Raises ValueError listing the missing, unexpected and mis-shaped paths when the trees differ.
    """
    template = traverse_util.flatten_dict({c: tree[name] for c, tree in variables.items() if name in tree})
    if not template:
        raise ValueError(f"the variables have no {name!r} subtree; collections: {sorted(variables)}")
    pretrained = traverse_util.flatten_dict(dict(pretrained_backbone_variables))

    def describe(path, leaf) -> str:
        return f"{'/'.join(path)} {tuple(np.shape(leaf))}"

    missing = [describe(p, leaf) for p, leaf in template.items() if p not in pretrained]
    unexpected = [describe(p, leaf) for p, leaf in pretrained.items() if p not in template]
    mis_shaped = [
        f"{'/'.join(p)}: got {tuple(np.shape(pretrained[p]))}, expected {tuple(np.shape(leaf))}"
        for p, leaf in template.items()
        if p in pretrained and np.shape(pretrained[p]) != np.shape(leaf)
    ]
    if missing or unexpected or mis_shaped:
        raise _mismatch_error(
            f"the pretrained variables do not match the model's {name!r}:", missing, unexpected, mis_shaped
        )

    merged_backbone = traverse_util.unflatten_dict({p: _like(pretrained[p], leaf) for p, leaf in template.items()})
    merged = {collection: dict(tree) for collection, tree in variables.items()}
    for collection, subtree in merged_backbone.items():
        merged[collection][name] = subtree
    return merged
