"""Images for inference: paths, PIL images or uint8 arrays in; RGB uint8 arrays out. No
TensorFlow: preprocessing is `blip_jax.data.preprocess` (numpy), the same code as evaluation.

`list_images` expands files, folders and `@list.txt` lazily, so a folder of any size streams.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from blip_jax.data import image_files
from blip_jax.data.image_files import ImageError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')


def to_rgb(image) -> np.ndarray:
  """A path, PIL image or array -> RGB uint8 [H, W, 3]: files and PIL images by the rule of
  `blip_jax.data.image_files` (the originals' `convert('RGB')`, 16-bit images scaled to 8 bits,
  EXIF orientation not applied), the same pixels as a dataset built from the same files."""
  from PIL import Image
  if isinstance(image, (str, os.PathLike)):
    return image_files.read(image)
  if isinstance(image, Image.Image):
    return image_files.rgb(image)
  array = np.asarray(image)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, -1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.dtype != np.uint8:
    raise ImageError(f'an image array must be uint8 [H, W, 3] (or grey [H, W], RGBA), got {array.dtype} '
                     f'{list(array.shape)}')
  return array[..., :3]


def list_images(inputs: Iterable[str], problems: list[str]) -> Iterator[str]:
  """Image paths of files, folders (their images, sorted) and @lists (one path per line), lazily;
  what cannot be listed is appended to `problems` (and skipped)."""
  for item in inputs:
    item = os.fspath(item)
    if item.startswith('@'):
      try:
        with open(item[1:]) as f:
          listed = [line.strip() for line in f if line.strip()]
      except OSError as e:
        problems.append(f'{item[1:]}: cannot read the list ({e.strerror})')
        continue
      yield from list_images(listed, problems)
    elif os.path.isdir(item):
      found = sorted(entry.path for entry in os.scandir(item) if entry.name.lower().endswith(IMAGE_EXTENSIONS))
      if not found:
        problems.append(f'{item}: folder holds no images ({", ".join(IMAGE_EXTENSIONS)})')
      yield from found
    elif os.path.isfile(item):
      yield item
    else:
      problems.append(f'{item}: no such file or folder')
