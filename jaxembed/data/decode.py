"""Decode any common image file into an RGB uint8 array, and find the files that cannot be decoded.

Decoding goes through Pillow for every source and every stage (load-time check, training, evaluation,
embedding) so that a file accepted by the check is decoded the same way later, and so that EXIF
orientation and unusual pixel modes (palette, CMYK, 16-bit, alpha) are handled in one place.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

# An item is where an image's encoded bytes live: a file path, or the bytes themselves (in-memory
# sources such as TFDS and the embedded default keep the encoded file, not decoded pixels).
ImageRef = str | bytes

# Transparent pixels are shown on white: most transparent images (logos, icons, scanned glyphs) are
# drawn to be seen on a light page, and their hidden RGB is often black, which would erase them.
_BACKGROUND = 255

# Images per task of the parallel load-time check.
_CHECK_CHUNK = 256


def decode_image(item: ImageRef) -> np.ndarray:
    """Decodes one image file (path or encoded bytes) to a `(height, width, 3)` uint8 RGB array.

    The EXIF orientation is applied, so the array is upright as a viewer shows it. Only the first frame
    of animated GIF/WebP is used. Grayscale, palette, CMYK and 16-bit images become 8-bit RGB; alpha is
    composited onto white.

    Raises:
      OSError, ValueError, SyntaxError, ...: whatever Pillow raises for a missing, unreadable, truncated
        or non-image file (callers that must not stop catch `Exception` and report the message).
    """
    return to_rgb_uint8(np.asarray(open_image(item)))


def open_image(item: ImageRef, *, draft_size: int | None = None) -> Image.Image:
    """Decodes like `decode_image`, but returns a Pillow image in mode "L" (gray sources) or "RGB".

    Keeping gray images single-channel makes resizing them three times cheaper; resizing an "L" image
    gives exactly the values of resizing its RGB copy, so results do not depend on the choice.

    Args:
      item: a file path or the encoded file's bytes.
      draft_size: if given, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
        while both sides stay at least this long: many times faster for large photos, and a good
        antialiased downscale, but not the same pixels as a full decode (so only training uses it).
    """
    if (len(item) if isinstance(item, bytes) else os.path.getsize(item)) == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as image:
        if draft_size is not None and image.format == "JPEG":
            image.draft(None, (draft_size, draft_size))
        image.load()  # decode errors surface here, as the file's fault
        try:
            ImageOps.exif_transpose(image, in_place=True)
        except Exception:  # noqa: BLE001 - unreadable EXIF says nothing about the pixels; keep them as stored.
            pass
        # Every branch returns a new image, so it outlives the file closed on leaving this block.
        return _to_gray_or_rgb(image)


def _to_gray_or_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit (and 32-bit) grayscale: Pillow's convert("L") clips at 255, turning a 16-bit scan
        # white; keep the top 8 bits of the 16-bit range instead.
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        return Image.fromarray((values >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return Image.fromarray(to_rgb_uint8(np.asarray(image.convert("RGBA"))))
    return image.convert("L" if image.mode in ("1", "L") else "RGB")


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Returns a uint8 `(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)` array as `(H, W, 3)` RGB.

    Gray is repeated into three channels; a fourth (alpha) channel is composited onto white.
    """
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image array, got dtype={array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    channels = array.shape[2]
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 4:
        rgb = array[:, :, :3].astype(np.uint32)
        alpha = array[:, :, 3:].astype(np.uint32)
        # Integer "over" compositing with rounding: rgb * a + background * (1 - a).
        blended = (rgb * alpha + _BACKGROUND * (255 - alpha) + 127) // 255
        return blended.astype(np.uint8)
    return array


def find_undecodable(items: Sequence[ImageRef], *, num_threads: int | None = None) -> dict[int, str]:
    """Fully decodes every item in parallel and returns `{position: reason}` for those that fail.

    Threads suffice because Pillow releases the GIL while decoding. JPEGs are decoded at 1/8 scale:
    libjpeg still reads every coefficient, so truncation and corruption are found, at a fraction of
    the cost for large photos. The reason is the exception's type and message, e.g.
    "OSError: image file is truncated (3 bytes not processed)".
    """
    num_threads = num_threads or min(32, 2 * (os.cpu_count() or 1))

    def failures(start: int) -> dict[int, str]:
        reasons = {}
        for position in range(start, min(start + _CHECK_CHUNK, len(items))):
            try:
                open_image(items[position], draft_size=1)
            except Exception as error:  # noqa: BLE001 - any failure makes the file unusable; report it.
                reasons[position] = describe_error(error)
        return reasons

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        # One task per chunk, not per image: a million pending futures would cost more than the check.
        chunks = pool.map(failures, range(0, len(items), _CHECK_CHUNK))
        return {position: reason for chunk in chunks for position, reason in chunk.items()}


def describe_error(error: BaseException) -> str:
    """One line naming the error type and message, for reports and logs."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
    if isinstance(error, Image.UnidentifiedImageError):
        # Pillow's message repeats the whole path; the report already names it.
        message = "not a recognised image format"
    return f"{type(error).__name__}: {message}"
