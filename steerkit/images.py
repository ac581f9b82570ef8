"""Reading the images a user hands to ``invert`` and ``edit``: every PIL mode, EXIF orientation, a pixel limit.

An image becomes a float array in [0, 1], ``[H, W, C]`` with ``C`` = 1 (grey) or 3 (RGB):

- **8-bit modes** (``L``, ``RGB``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``, ``1``)
  go through PIL's own conversions to ``L`` or ``RGB`` and are divided by 255.
- **16-bit and 32-bit integer modes** (``I;16*``, ``I``) are read as 16-bit intensities: divided by
  65535 (a 16-bit PNG opens as ``I;16``, or as ``I`` in older Pillow), never clipped to 8 bits.
  **Float** images (``F``) are read as intensities in [0, 1]. Values outside the range are clipped.
- **Transparency** (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, and a palette with a
  transparent entry) is composited on **black**: the background of the bundled Fashion-MNIST
  models, and what premultiplied alpha means, so a transparent pixel is 0 whatever colour the file
  stores behind it.
- Grey from colour uses PIL's ``L`` weights (ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B); colour
  from grey repeats the channel.
- **EXIF orientation** is applied (``ImageOps.exif_transpose``): a photo is read the way viewers show it.
- **Size**: an image of more than ``max_pixels`` pixels is refused before it is decoded (a
  decompression bomb never reaches memory).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

__all__ = ["MAX_PIXELS", "image_to_array", "open_image"]

#: The most pixels steerkit decodes from one image file (8192 × 8192).
MAX_PIXELS = 8192 * 8192
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS):
    """Open and decode ``path`` with its EXIF orientation applied.

    Raises:
        ValueError: the file is missing, not an image PIL reads, or larger than ``max_pixels``.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is lower, and says more
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(f"image {str(path)!r} is too large to read (more than {max_pixels:,} pixels)") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError... for bad files
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        raise ValueError(f"cannot read image {str(path)!r}: {reason}") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ValueError(f"image {str(path)!r} is {width}×{height} ({width * height:,} pixels), more than the "
                         f"{max_pixels:,} steerkit reads; shrink it first")
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error or type(error).__name__}") from None


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)


def _resized(array: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Bicubic resize of a float ``[H, W, C]`` array, channel by channel, in float (no 8-bit rounding)."""
    from PIL import Image

    if size is None or array.shape[1::-1] == tuple(size):
        return array
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c]), mode="F").resize(size, Image.BICUBIC))
              for c in range(array.shape[2])]
    return np.clip(np.stack(planes, axis=2), 0.0, 1.0)


def image_to_array(image, channels: int | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """A PIL image → float32 ``[H, W, C]`` in [0, 1] (module docstring: the rules for every mode).

    Args:
        channels: 1 (grey) or 3 (RGB); ``None`` keeps grey images grey and makes everything else RGB.
        size: ``(width, height)`` to resize to (bicubic), or ``None``.
    """
    from PIL import Image

    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    size = None if size is None else (int(size[0]), int(size[1]))
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "F":
        scale = 1.0 if mode == "F" else 65535.0
        grey = _resized(np.clip(np.asarray(image, dtype=np.float32) / scale, 0.0, 1.0)[..., None], size)
        return np.repeat(grey, 3, axis=2) if channels == 3 else grey
    if _has_alpha(image):
        if mode in ("RGBa", "La"):  # premultiplied: already composited on black
            rgb = np.asarray(image, dtype=np.float32)[..., :-1] / 255.0
            rgb = np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb
        else:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
            rgb = rgba[..., :3] * rgba[..., 3:]
        rgb = _resized(rgb, size)
        if channels == 3 or (channels is None and mode not in ("LA", "La")):
            return rgb
        return (rgb @ _LUMA)[..., None]
    grey_source = mode in ("L", "1")
    if channels == 1 or (channels is None and grey_source):
        converted = image.convert("L") if grey_source else image.convert("RGB").convert("L")
    else:
        converted = image.convert("RGB")
    if size is not None and converted.size != size:
        converted = converted.resize(size, Image.BICUBIC)  # in 8 bits, as the image is stored
    array = np.asarray(converted, dtype=np.float32) / 255.0
    return array[..., None] if array.ndim == 2 else array
