"""Image files -> RGB uint8 [H, W, 3], one rule for datasets, predict and CapFilt.

The originals read every image with `Image.open(path).convert('RGB')`; so does blip_jax, with one
exception: a 16-bit image (PNG depth maps, scans) keeps its top 8 bits (`v >> 8`, as TensorFlow's
decoder does), where `convert('RGB')` would clip everything above 255 to white. So:

- grey is repeated into three channels, palette images are looked up;
- RGBA / LA lose their alpha channel (not blended onto a background);
- CMYK is converted by PIL's rule (the originals' pixels);
- the EXIF orientation is not applied: pixels are used as stored, as the originals do.

Images PIL refuses as too large (over `PIL.Image.MAX_IMAGE_PIXELS`, 89M pixels, twice over for
an error: its decompression-bomb guard) are an `ImageError`, like missing or corrupt files.
No TensorFlow here (predict imports this).
"""

from __future__ import annotations

import os

import numpy as np

# Files whose bytes a TFDS Image feature can keep as they are: its decoder (PIL or OpenCV) gives
# the same pixels as the rule above only for these modes. Everything else is stored decoded.
STORED_AS_IS = {'JPEG': ('RGB', 'L'), 'PNG': ('RGB', 'L')}
_16_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


class ImageError(ValueError):
  """An input that is not a readable image (names it and says why)."""


def rgb(image) -> np.ndarray:
  """A PIL image -> RGB uint8 [H, W, 3] by the rule above."""
  if image.mode in _16_BIT:
    grey = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, -1)
  return np.asarray(image.convert('RGB'))


def _opened(path):
  from PIL import Image
  try:
    image = Image.open(path)
    image.load()  # decode now: a truncated file fails here, not later in a batch
    return image
  except FileNotFoundError:
    raise ImageError(f'{os.fspath(path)}: no such file') from None
  except Image.DecompressionBombError as e:
    raise ImageError(f'{os.fspath(path)}: too large to decode safely ({e})') from None
  except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for files that are not images
    raise ImageError(f'{os.fspath(path)}: not a readable image ({e})') from None


def read(path) -> np.ndarray:
  """The RGB uint8 pixels of the image file `path`; an `ImageError` naming it when it is missing,
  not an image, truncated or too large."""
  with _opened(path) as image:
    return rgb(image)


def stored_as_is(path) -> bool:
  """Whether `path` decodes (an `ImageError` if not) to the rule's pixels in TFDS as it is."""
  with _opened(path) as image:
    return image.mode in STORED_AS_IS.get(image.format, ())
