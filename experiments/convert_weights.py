"""Converts a PyTorch state dict (.pth) to .safetensors once, so jaxembed can load it without torch.

    python experiments/convert_weights.py resnet50-11ad3fa6.pth --arch resnet50
    python experiments/convert_weights.py bn_inception-52deb4733.pth --arch inception_bn --out bninception.safetensors

Needs torch (to read the .pth) and safetensors. The output (default: the input
with a .safetensors suffix) holds the same names and values as float32 NumPy
arrays; load it anywhere with `jaxembed.models.load_pretrained(arch, path)`.
With --arch the weights are first checked against that architecture (names and
shapes; the classifier is not checked), so a wrong file fails here, not later.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from safetensors.numpy import save_file

from jaxembed import models
from jaxembed.models import pretrained


def convert(source: str, destination: str, arch: str | None = None) -> dict[str, np.ndarray]:
    """Writes `source`'s state dict to `destination` as safetensors and returns it (name -> array)."""
    state = pretrained.read_state_dict(source)
    if arch is not None:
        pretrained.variables_from_state_dict(arch, state)  # raises ValueError naming every mismatch
    state = {name: np.ascontiguousarray(value) for name, value in state.items()}
    save_file(state, destination, metadata={"converted_from": os.path.basename(source)})
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a .pth state dict (torchvision, or the BN-Inception port)")
    parser.add_argument("--out", default=None, help="output .safetensors file (default: beside the source)")
    parser.add_argument("--arch", choices=models.ARCHS, default=None, help="check the weights against this arch")
    args = parser.parse_args(argv)
    destination = args.out or os.path.splitext(args.source)[0] + ".safetensors"
    try:
        state = convert(args.source, destination, args.arch)
    except (ValueError, ImportError, OSError) as error:
        print(f"convert_weights: error: {error}", file=sys.stderr)
        return 1
    size_mb = sum(value.nbytes for value in state.values()) / 2**20
    print(f"wrote {destination}: {len(state)} tensors, {size_mb:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
