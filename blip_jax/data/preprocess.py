"""Evaluation image preprocessing in numpy (no TensorFlow), as the originals do it:

- `blip_eval`: squash-resize to S x S (bicubic, no crop), then normalise (BLIP / BLIP-2 eval);
- `clip_eval`: resize the shorter side to S (bicubic), centre-crop S x S, normalise (CLIP).

Resizing is antialiased Keys bicubic (a = -0.5) on [0, 1] floats, clipped to [0, 1]: the same
filter as `tf.image.resize(..., 'bicubic', antialias=True)`, which the training transform
(`transforms.blip_train`) uses for its crops, and as `jax.image.resize`. Like PIL's, the filter
widens when downscaling, so downscaled images match the originals' torchvision / PIL pipelines
closely (tests/data/test_transforms.py measures both). Inputs are uint8 HWC images; outputs
float32 HWC normalised with the CLIP / BLIP mean and std.
"""

from __future__ import annotations

import functools

import numpy as np

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 or [0, 1] float image -> (x - mean) / std, float32."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255.0
  return ((image - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)).astype(np.float32)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
  x = np.abs(x)
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  return np.where(x >= 2.0, 0.0, np.where(x >= 1.0, far, near))


@functools.lru_cache(maxsize=256)
def _taps(input_size: int, output_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, weights) [output_size, K] of the antialiased bicubic filter along one axis: output
  pixel i is sum_k weights[i, k] * input[indices[i, k]] (scale_and_translate's weight matrix,
  kept to its non-zero band)."""
  scale = output_size / input_size
  kernel_scale = max(1.0 / scale, 1.0)  # widen the filter when downscaling (antialiasing)
  sample = (np.arange(output_size, dtype=np.float64) + 0.5) / scale - 0.5
  weights = _keys_cubic((sample[:, None] - np.arange(input_size)[None, :]) / kernel_scale)
  total = weights.sum(1, keepdims=True)
  weights = np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps, weights / np.where(total != 0, total, 1), 0)
  weights[(sample < -0.5) | (sample > input_size - 0.5)] = 0
  nonzero = weights != 0
  first = np.where(nonzero.any(1), nonzero.argmax(1), 0)
  width = int(max(1, (nonzero.shape[1] - nonzero[:, ::-1].argmax(1) - first).max()))
  indices = np.minimum(first[:, None] + np.arange(width)[None, :], input_size - 1)
  band = np.take_along_axis(weights, indices, 1) * (first[:, None] + np.arange(width)[None, :] < input_size)
  return indices, band.astype(np.float32)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 HWC -> float32 [height, width, C] in [0, 1], antialiased bicubic."""
  x = np.asarray(image, np.float32) / 255.0
  rows, row_w = _taps(x.shape[0], height)
  x = np.einsum('hk,hkwc->hwc', row_w, x[rows])
  cols, col_w = _taps(x.shape[1], width)
  x = np.einsum('wk,hwkc->hwc', col_w, x[:, cols])
  return np.clip(x, 0.0, 1.0)


def blip_eval(image: np.ndarray, size: int) -> np.ndarray:
  """Squash-resize to size x size, normalise."""
  return normalize(resize(image, size, size))


def clip_eval(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision's Resize(size) (shorter side to `size`, longer side truncated) + CenterCrop."""
  h, w = image.shape[:2]
  short = min(h, w)
  new_h, new_w = (size, size * w // short) if h == short else (size * h // short, size)
  resized = resize(image, new_h, new_w)
  # CenterCrop's offset: round((new - size) / 2), half to even like Python's round.
  top, left = round((new_h - size) / 2), round((new_w - size) / 2)
  return normalize(resized[top:top + size, left:left + size])


EVAL_TRANSFORMS = {'blip_eval': blip_eval, 'clip_eval': clip_eval}


def eval_transform(kind: str, size: int):
  """`image -> float32 S x S x 3` of `kind` ('blip_eval' | 'clip_eval')."""
  if kind not in EVAL_TRANSFORMS:
    raise ValueError(f'eval image transform must be one of {sorted(EVAL_TRANSFORMS)}, got {kind!r}')
  return functools.partial(EVAL_TRANSFORMS[kind], size=size)
