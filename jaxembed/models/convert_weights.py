"""Converts a PyTorch state dict (.pth) to .safetensors once, so jaxembed can load it without torch.

    python -m jaxembed.convert_weights resnet50-11ad3fa6.pth --arch resnet50
    python -m jaxembed.convert_weights bn_inception-52deb4733.pth --arch inception_bn --out bninception.safetensors

Needs torch (to read the .pth; `pip install -e '.[torch]'`) and safetensors. The output (default: the
input with a .safetensors suffix) holds the same names and values as float32 NumPy arrays; load it
anywhere with `jaxembed.models.load_pretrained(arch, path)`. With --arch the weights are first checked
against that architecture (names and shapes; the classifier is not checked), so a wrong file fails
here, not later. Every error names the file it is about; the exit status is then 1.
"""

from __future__ import annotations

import os

import numpy as np

from jaxembed import fileio
from jaxembed.models import pretrained

def convert(source: str, destination: str, arch: str | None = None) -> dict[str, np.ndarray]:
    """Writes `source`'s state dict to `destination` as safetensors and returns it (name -> array).

    Raises:
      FileNotFoundError: `source`, or the folder of `destination`, does not exist.
      ValueError: `source` is not a state dict, or (with `arch`) does not match that architecture;
        the message names `source`.
      ImportError: torch or safetensors is missing.
      OSError: `destination` cannot be written (the message names it).
    """
    from safetensors.numpy import save  # an optional dependency: imported on use

    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source} not found: expected a .pth state dict")
    folder = os.path.dirname(os.path.abspath(destination))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {destination}: the folder {folder} does not exist")
    try:
        state = pretrained.read_state_dict(source)
    except (ImportError, ValueError):
        raise
    except Exception as error:  # noqa: BLE001 - torch.load fails on a non-checkpoint in many ways (pickle, zip)
        raise ValueError(f"{source} is not a readable PyTorch state dict "
                         f"({type(error).__name__}: {error})") from None
    if arch is not None:
        try:
            pretrained.variables_from_state_dict(arch, state)  # raises ValueError naming every mismatch
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    state = {name: np.ascontiguousarray(value) for name, value in state.items()}
    # Written whole under its name (atomically): an interrupted conversion leaves no half file.
    try:
        fileio.write_bytes(destination, save(state, metadata={"converted_from": os.path.basename(source)}))
    except OSError as error:
        raise OSError(f"cannot write {destination}: {error.strerror or error}") from None
    return state


def naming(error: BaseException, *paths: str) -> str:
    """The error's message, prefixed with the file when the message does not already name one."""
    message = str(error) or type(error).__name__
    return message if any(path in message for path in paths) else f"{paths[0]}: {message}"
