"""Pure per-image geometry: the evaluation crop and the training augmentation.

Each is one Pillow `resize` from a (sub-pixel) box of the source to the square output, so cropping and
resampling happen in a single antialiased pass, and Pillow releases the GIL while it runs (which lets
the input pipeline run them in parallel threads). Outputs are uint8: normalisation happens inside the
model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from jaxembed.data.decode import to_rgb_uint8

# Bilinear with Pillow's support scaling: antialiased when shrinking, smooth when enlarging tiny images.
_RESAMPLE = Image.Resampling.BILINEAR

# Random-resized-crop aspect ratios (width / height), the standard Inception range.
_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)

# Uniform random numbers an `Augmentation` consumes per image: five for the crop and the flip, five
# for random erasing, then two for the rotation and shear. Each group is drawn after the ones before it,
# so adding one left every earlier run's crops, flips and rectangles as they were.
CROP_FLIP_RANDOMS, ERASE_RANDOMS, AFFINE_RANDOMS = 5, 5, 2
NUM_AUGMENT_RANDOMS = CROP_FLIP_RANDOMS + ERASE_RANDOMS + AFFINE_RANDOMS

CROPS = ("resized", "pad")

# Shears up to this many degrees either way (tan grows without bound towards 90); rotations up to a
# half turn either way, which already reaches every angle.
MAX_SHEAR_DEGREES = 45.0
MAX_ROTATION_DEGREES = 180.0

# Random erasing (Zhong et al., 2017): the erased rectangle covers 2%-33% of the image, with a
# log-uniform aspect ratio in [0.3, 3.3], filled with mid-grey, which normalisation (ImageNet mean
# 0.41-0.49) maps close to zero, as the paper's and timm's mean-value fill.
_ERASE_AREA = (0.02, 1 / 3)
_ERASE_ASPECT_RATIO = (0.3, 1 / 0.3)
ERASE_FILL = 128


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


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The random training augmentation: a crop to an `image_size` square, a rotation and shear, a
    horizontal flip, then random erasing; called on one image with its random numbers.

    `crop="resized"`: a random-resized crop covering a fraction of the image area drawn uniformly from
    `crop_area`, with a log-uniform aspect ratio in [3/4, 4/3], at a uniform position; where that box
    would leave the image it is clipped to the image, so there is no rejection loop and the result is a
    pure function of the numbers. `crop="pad"`: the evaluation view (`center_crop`), its border pixels
    repeated `crop_padding` times on every side, cropped back to `image_size` at a uniform offset: shifts
    of up to `crop_padding` pixels at the full scale (the standard for 28-32 px images). Then, when either
    range is non-zero, `rotate_and_shear` by angles drawn uniformly from +-`rotation_degrees` and
    +-`shear_degrees`.

    `crop_area` defaults to (0.25, 1) rather than ImageNet's (0.08, 1): for embeddings the concept must
    remain recognisable in the crop, and small images (8x8 digits, 105x105 glyphs) have little to spare.

    Attributes:
      crop: "resized" or "pad".
      crop_area: (smallest, largest) fraction of the image area a resized crop covers, within (0, 1].
      crop_padding: pixels of padding on each side for `crop="pad"`.
      flip: whether to flip horizontally half of the time (off by default: a mirrored character or
        digit is another concept).
      erase_probability: the chance that a rectangle of the output is replaced by mid-grey.
      rotation_degrees, shear_degrees: the largest rotation and shear, in degrees (0: none).

    Raises:
      ValueError: naming the attribute out of range.
    """

    crop: str = "resized"
    crop_area: tuple[float, float] = (0.25, 1.0)
    crop_padding: int = 4
    flip: bool = False
    erase_probability: float = 0.0
    rotation_degrees: float = 0.0
    shear_degrees: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "crop_area", tuple(float(a) for a in self.crop_area))
        if len(self.crop_area) != 2 or not 0 < self.crop_area[0] <= self.crop_area[1] <= 1:
            raise ValueError(f"crop_area must satisfy 0 < min <= max <= 1, got crop_area={self.crop_area}")
        if self.crop not in CROPS or self.crop_padding < 0 or not 0 <= self.erase_probability <= 1:
            raise ValueError(f"crop={self.crop!r} (expected one of {', '.join(CROPS)}), crop_padding="
                             f"{self.crop_padding} (expected >= 0), erase_probability={self.erase_probability} "
                             "(expected 0..1)")
        if not (0 <= self.rotation_degrees <= MAX_ROTATION_DEGREES and 0 <= self.shear_degrees <= MAX_SHEAR_DEGREES):
            raise ValueError(f"rotation_degrees={self.rotation_degrees} (expected 0..{MAX_ROTATION_DEGREES}) and "
                             f"shear_degrees={self.shear_degrees} (expected 0..{MAX_SHEAR_DEGREES})")

    @classmethod
    def from_config(cls, config) -> Augmentation:
        """The augmentation a training config (`jaxembed.templates.Config`) asks for."""
        return cls(crop=config.crop, crop_area=(config.min_crop_area, 1.0), crop_padding=config.crop_padding,
                   flip=config.flip, erase_probability=config.random_erasing,
                   rotation_degrees=config.rotation_degrees, shear_degrees=config.shear_degrees)

    def __call__(self, image: Image.Image, image_size: int, randoms: np.ndarray) -> np.ndarray:
        """`image` augmented to an `image_size` square.

        Args:
          image: a Pillow image in mode "L" or "RGB".
          image_size: side of the square output.
          randoms: `NUM_AUGMENT_RANDOMS` floats in [0, 1): area, aspect ratio, x, y, flip; then erasing's
            whether, area, aspect ratio, x, y; then the rotation and the shear.

        Returns:
          uint8 `(image_size, image_size, channels)`, 1 channel for "L" input and 3 for "RGB".
        """
        crop_flip, erasing, affine = np.split(np.asarray(randoms)[:NUM_AUGMENT_RANDOMS],
                                              [CROP_FLIP_RANDOMS, CROP_FLIP_RANDOMS + ERASE_RANDOMS])
        u_area, u_ratio, u_x, u_y, u_flip = (float(u) for u in crop_flip)
        if self.crop == "pad":
            pad = self.crop_padding
            view = np.atleast_3d(np.asarray(center_crop(image, image_size)))
            padded = np.pad(view, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
            left, top = (min(int(u * (2 * pad + 1)), 2 * pad) for u in (u_x, u_y))
            pixels = padded[top:top + image_size, left:left + image_size]
        else:
            width, height = image.size
            smallest, largest = self.crop_area
            area = height * width * (smallest + u_area * (largest - smallest))
            aspect_ratio = _log_uniform(u_ratio, _ASPECT_RATIO_RANGE)
            crop_width = min(float(width), math.sqrt(area * aspect_ratio))
            crop_height = min(float(height), math.sqrt(area / aspect_ratio))
            left, top = u_x * (width - crop_width), u_y * (height - crop_height)
            box = (left, top, left + crop_width, top + crop_height)
            pixels = np.atleast_3d(np.asarray(image.resize((image_size, image_size), _RESAMPLE, box=box)))
        if self.rotation_degrees or self.shear_degrees:
            u_rotation, u_shear = (float(u) for u in affine)
            pixels = rotate_and_shear(pixels, self.rotation_degrees * (2 * u_rotation - 1),
                                      self.shear_degrees * (2 * u_shear - 1))
        if self.flip and u_flip < 0.5:
            pixels = pixels[:, ::-1]
        return erase_rectangle(pixels, erasing, self.erase_probability)


def rotate_and_shear(pixels: np.ndarray, rotation_degrees: float, shear_degrees: float) -> np.ndarray:
    """`pixels` sheared horizontally, then rotated, about the image centre; uncovered corners get the
    background colour.

    The forward map of a point p (x right, y down, relative to the centre) is `R(rotation) S(shear) p`,
    with `S = [[1, tan(shear)], [0, 1]]` (rows further down shift right for a positive shear) and `R`
    the rotation that turns the image counter-clockwise as displayed for a positive angle (at 90 degrees,
    `np.rot90`). Each output pixel is sampled bilinearly at the inverse map of its centre (Pillow's
    affine transform). The background is the per-channel median of the border pixels: white for glyphs
    on paper, black for products on black, so the filled corners look like the rest of the margin
    (Koch et al. 2015 drew such rotations and shears of Omniglot characters for one-shot learning).

    Args:
      pixels: uint8 `(H, W, C)`, C = 1 or 3.
      rotation_degrees, shear_degrees: the angles, in degrees.

    Returns:
      uint8 `(H, W, C)`.
    """
    height, width, channels = pixels.shape
    rotation, shear = math.radians(rotation_degrees), math.radians(shear_degrees)
    cos, sin = math.cos(rotation), math.sin(rotation)
    # y points down, so a counter-clockwise turn on screen maps (x, y) to (x cos + y sin, -x sin + y cos).
    # The inverse of R S is S^-1 R^T: turn back, then shear by -tan(shear).
    inverse = np.array([[1.0, -math.tan(shear)], [0.0, 1.0]]) @ np.array([[cos, -sin], [sin, cos]])
    centre = np.array([width / 2, height / 2])  # Pillow's pixel (i, j) covers [i, i + 1) x [j, j + 1)
    offset = centre - inverse @ centre
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = tuple(int(v) for v in np.median(border, axis=0).round())
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    # Rounded so that quarter turns sample exactly at pixel centres: Pillow's 8-bit bilinear truncates, so
    # a point 1e-16 short of a centre (cos 90 degrees is 6e-17 in floating point) would lose a grey level.
    coefficients = tuple(round(float(c), 9) for c in (*inverse[0], offset[0], *inverse[1], offset[1]))
    moved = image.transform((width, height), Image.Transform.AFFINE, coefficients, _RESAMPLE,
                            fillcolor=background[0] if channels == 1 else background)
    return np.atleast_3d(np.asarray(moved))


def erase_rectangle(pixels: np.ndarray, randoms: np.ndarray, probability: float) -> np.ndarray:
    """`pixels` with a random rectangle set to `ERASE_FILL`, with the chance `probability` (random erasing).

    `randoms`: `ERASE_RANDOMS` floats in [0, 1): whether (erase when below `probability`), area, aspect
    ratio (height / width), x, y. A rectangle taller or wider than the image is clipped to it.
    """
    u_apply, u_area, u_ratio, u_x, u_y = (float(u) for u in randoms)
    if u_apply >= probability:
        return pixels
    height, width = pixels.shape[:2]
    area = height * width * (_ERASE_AREA[0] + u_area * (_ERASE_AREA[1] - _ERASE_AREA[0]))
    aspect_ratio = _log_uniform(u_ratio, _ERASE_ASPECT_RATIO)
    erase_height = min(height, max(1, round(math.sqrt(area * aspect_ratio))))
    erase_width = min(width, max(1, round(math.sqrt(area / aspect_ratio))))
    top = min(int(u_y * (height - erase_height + 1)), height - erase_height)
    left = min(int(u_x * (width - erase_width + 1)), width - erase_width)
    erased = pixels.copy()
    erased[top:top + erase_height, left:left + erase_width] = ERASE_FILL
    return erased


def _log_uniform(u: float, bounds: tuple[float, float]) -> float:
    """The number log-uniformly between `bounds` at quantile `u`."""
    low, high = math.log(bounds[0]), math.log(bounds[1])
    return math.exp(low + u * (high - low))
