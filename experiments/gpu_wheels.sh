#!/usr/bin/env bash
# Prepares what experiments/gpu_check.py needs on the lent GPU machine (Python 3.12, JAX with CUDA, flax,
# optax, orbax, numpy, pillow, tensorboard; no network): the wheels of the packages its image lacks, in
# .whl/, and Fashion-MNIST's four idx files, in .gpu_data/ (both ignored by git, carried by the call).
# Usage, in the repository root: bash experiments/gpu_wheels.sh [FASHION_MNIST_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source=${1:-/usr/share/datasets/fashion-mnist}
grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu_data/' .git/info/exclude || echo '/.gpu_data/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl .gpu_data
# The input pipeline (grain) and what it needs beyond that image: array-record, portpicker.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
cp "$source"/*-ubyte.gz .gpu_data/
du -sh .whl .gpu_data
