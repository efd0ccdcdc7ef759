"""BLIP's RandAugment in TensorFlow ops: `RandomAugment(2, 5, isPIL=True, augs=[...])` of the
originals' `transform/randaugment.py`, seeded statelessly so pipelines stay deterministic.

Each of `num_ops` draws picks one op uniformly (with replacement) and applies it with
probability 1/2. At the originals' magnitude 5 of 10: shears of 0.15, translations of 5 px and
rotations of 15 degrees, each with a random sign, filled with grey 128; Brightness and Sharpness
get the factor `5 / 10 * 1.8 + 0.1 = 1.0`, i.e. they leave the image unchanged, as there.
"""

from __future__ import annotations

import math

import tensorflow as tf

OPS = ('Identity', 'AutoContrast', 'Equalize', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX',
       'TranslateY', 'Rotate')
MAX_LEVEL = 10
FILL = 128.0


def _affine(image, forward):
  """cv2.warpAffine(image, forward) with bilinear sampling and grey fill: `forward` (2 x 3)
  maps input pixel coordinates to output ones, so the sampler gets its inverse."""
  a, t = forward[:, :2], forward[:, 2:]
  inv = tf.linalg.inv(a)
  back = tf.concat([inv, -inv @ t], 1)
  transform = tf.concat([tf.reshape(back, [6]), tf.zeros([2])], 0)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=tf.cast(image, tf.float32)[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=FILL, interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  return tf.cast(tf.clip_by_value(out, 0, 255), tf.uint8)


def autocontrast(image):
  """PIL.ImageOps.autocontrast (cutoff 0), per channel: stretch [min, max] to [0, 255]."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  out = tf.cast(tf.clip_by_value((x - lo) * scale, 0, 255), tf.uint8)  # the originals truncate
  return tf.where(hi > lo, out, image)


def _equalize_channel(ch):
  hist = tf.math.bincount(tf.cast(tf.reshape(ch, [-1]), tf.int32), minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))  # count of the highest occupied level
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (tf.cumsum(tf.concat([[step // 2], hist[:-1]], 0)) // tf.maximum(step, 1))
  lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)
  return tf.where(step == 0, ch, tf.gather(lut, tf.cast(ch, tf.int32)))


def equalize(image):
  """PIL.ImageOps.equalize, per channel."""
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def brightness(image, factor):
  return tf.cast(tf.clip_by_value(tf.cast(image, tf.float32) * factor, 0, 255), tf.uint8)


def sharpness(image, factor):
  """Blend with a 3 x 3 smoothed copy (centre 5, rest 1, / 13), borders untouched."""
  x = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0, 255)  # cv2.filter2D rounds to uint8
  inner = smooth + factor * (x[1:-1, 1:-1] - smooth)
  out = tf.pad(inner, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros_like(inner, tf.bool), [[1, 1], [1, 1], [0, 0]], constant_values=True)
  return tf.cast(tf.clip_by_value(tf.where(border, x, out), 0, 255), tf.uint8)


def _op(index, image, magnitude, sign):
  level = magnitude / MAX_LEVEL
  shear, shift, degrees = sign * level * 0.3, sign * level * 10.0, sign * level * 30.0
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  rad = degrees * math.pi / 180
  cos, sin = tf.cos(rad), tf.sin(rad)
  cx, cy = w / 2, h / 2
  rotate = tf.stack([[cos, sin, (1 - cos) * cx - sin * cy], [-sin, cos, sin * cx + (1 - cos) * cy]])
  enhance = level * 1.8 + 0.1
  branches = [
      lambda: image,
      lambda: autocontrast(image),
      lambda: equalize(image),
      lambda: brightness(image, enhance),
      lambda: sharpness(image, enhance),
      lambda: _affine(image, tf.stack([[1.0, shear, 0.0], [0.0, 1.0, 0.0]])),
      lambda: _affine(image, tf.stack([[1.0, 0.0, 0.0], [shear, 1.0, 0.0]])),
      lambda: _affine(image, tf.stack([[1.0, 0.0, -shift], [0.0, 1.0, 0.0]])),
      lambda: _affine(image, tf.stack([[1.0, 0.0, 0.0], [0.0, 1.0, -shift]])),
      lambda: _affine(image, rotate),
  ]
  return tf.switch_case(index, branches)


def apply_op(image, name: str, magnitude: float = 5.0, sign: float = 1.0):
  """One named op at `magnitude` (the tests compare each op with its definition)."""
  return _op(tf.constant(OPS.index(name)), image, tf.constant(magnitude, tf.float32), tf.constant(sign, tf.float32))


def randaugment(image, seed, num_ops: int = 2, magnitude: float = 5.0):
  """`num_ops` random ops on a uint8 HWC image, each applied with probability 1/2."""
  seeds = tf.random.experimental.stateless_split(seed, 3 * num_ops)
  magnitude = tf.constant(magnitude, tf.float32)
  for i in range(num_ops):
    index = tf.random.stateless_uniform([], seeds[3 * i], 0, len(OPS), tf.int32)
    apply = tf.random.stateless_uniform([], seeds[3 * i + 1]) < 0.5
    sign = tf.where(tf.random.stateless_uniform([], seeds[3 * i + 2]) < 0.5, -1.0, 1.0)
    image = tf.cond(apply, lambda: _op(index, image, magnitude, sign), lambda: image)
  return image
