"""Pure per-image geometry: the evaluation crop and the training augmentation.

Each is one Pillow `resize` from a (sub-pixel) box of the source to the square output, so cropping and
resampling happen in a single antialiased pass, and Pillow releases the GIL while it runs (which lets
the tf.data pipeline run them in parallel threads). Outputs are uint8: normalisation happens inside the
model.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from jaxembed.data.decode import to_rgb_uint8

# Bilinear with Pillow's support scaling: antialiased when shrinking, smooth when enlarging tiny images.
_RESAMPLE = Image.Resampling.BILINEAR

# Random-resized-crop aspect ratios (width / height), the standard Inception range.
_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)

# Number of uniform random numbers `augment_for_train` consumes per image.
NUM_AUGMENT_RANDOMS = 5


def preprocess_for_eval(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resizes the shorter side to `image_size` and takes the centre square.

    The evaluation pipeline applies exactly this to each decoded image, so calling it on the array
    `jaxembed.data.decode_image` returns gives the same bytes as `eval_batches`.

    Args:
      image: uint8 `(H, W, 3)` RGB, or `(H, W)` / `(H, W, 1)` gray, or `(H, W, 4)` RGBA (composited on
        white).
      image_size: side of the square output, in pixels.

    Returns:
      uint8 `(image_size, image_size, 3)`.
    """
    rgb = Image.fromarray(to_rgb_uint8(np.asarray(image)))
    return np.asarray(center_crop(rgb, image_size))


def center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """`preprocess_for_eval` on a Pillow image: the centred square of side min(H, W), resized.

    Cropping the square first and resizing it once equals "resize the shorter side to image_size, then
    centre crop", without rounding the longer side in between.
    """
    width, height = image.size
    side = min(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    return image.resize((image_size, image_size), _RESAMPLE, box=(left, top, left + side, top + side))


def augment_for_train(
    image: Image.Image,
    image_size: int,
    randoms: np.ndarray,
    *,
    crop_area: tuple[float, float],
    flip: bool,
) -> np.ndarray:
    """Random-resized crop to an `image_size` square, then a random horizontal flip.

    The crop covers a fraction of the image area drawn uniformly from `crop_area`, with a log-uniform
    aspect ratio in [3/4, 4/3], at a uniform position; where that box would leave the image it is
    clipped to the image, so there is no rejection loop and the result is a pure function of `randoms`.

    Args:
      image: a Pillow image in mode "L" or "RGB".
      image_size: side of the square output.
      randoms: `NUM_AUGMENT_RANDOMS` floats in [0, 1): area, aspect ratio, x, y, flip.
      crop_area: (smallest, largest) fraction of the image area the crop covers, within (0, 1].
      flip: whether to flip horizontally half of the time.

    Returns:
      uint8 `(image_size, image_size, channels)`, 1 channel for "L" input and 3 for "RGB".
    """
    width, height = image.size
    u_area, u_ratio, u_x, u_y, u_flip = (float(u) for u in randoms)
    area = height * width * (crop_area[0] + u_area * (crop_area[1] - crop_area[0]))
    log_low, log_high = math.log(_ASPECT_RATIO_RANGE[0]), math.log(_ASPECT_RATIO_RANGE[1])
    aspect_ratio = math.exp(log_low + u_ratio * (log_high - log_low))
    crop_width = min(float(width), math.sqrt(area * aspect_ratio))
    crop_height = min(float(height), math.sqrt(area / aspect_ratio))
    left, top = u_x * (width - crop_width), u_y * (height - crop_height)
    box = (left, top, left + crop_width, top + crop_height)
    pixels = np.atleast_3d(np.asarray(image.resize((image_size, image_size), _RESAMPLE, box=box)))
    return pixels[:, ::-1] if flip and u_flip < 0.5 else pixels
