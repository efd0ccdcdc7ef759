"""The training image transform in TensorFlow ops, as the originals do it, and `image_function`,
the callable the loaders apply to every image.

- `blip_train`: RandomResizedCrop(S, scale=(0.5, 1.0), bicubic), a horizontal flip and
  RandAugment (2 ops, magnitude 5, the originals' op list: `randaugment.py`), then normalise;
- `blip_eval` / `clip_eval`: the evaluation transforms, in numpy (`preprocess.py`, shared with
  inference, which needs no TensorFlow).

Inputs are uint8 HWC images; outputs float32 HWC, normalised with the CLIP/BLIP mean and std.
Resizing uses antialiased bicubic filtering (the same filter in both files), like PIL's, so
downscaled images match the originals' torchvision/PIL pipelines closely.
"""

from __future__ import annotations

import tensorflow as tf

from blip_jax.data import preprocess
from blip_jax.data.preprocess import MEAN, STD
from blip_jax.data.randaugment import randaugment


def normalize(image):
  """uint8 or [0, 1] float image -> (x - mean) / std, float32."""
  image = tf.convert_to_tensor(image)
  if image.dtype == tf.uint8:
    image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(MEAN)) / tf.constant(STD)


def _resize(image, height, width):
  image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (height, width), method='bicubic',
                          antialias=True)
  return tf.clip_by_value(image, 0.0, 1.0)


def blip_train(image, size: int, seed, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True,
               randaugment_ops: int = 2):
  """A random crop covering `scale` of the area with aspect ratio in `ratio`, resized to S x S,
  flipped with probability 1/2, then RandAugment on the uint8 image (as the originals apply it to
  the PIL image); `seed` is a stateless [2] int seed (deterministic pipelines)."""
  shape = tf.shape(image)
  area = tf.cast(shape[0] * shape[1], tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 5)
  target_area = area * tf.random.stateless_uniform([], seeds[0], scale[0], scale[1])
  log_ratio = tf.random.stateless_uniform([], seeds[1], tf.math.log(ratio[0]), tf.math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
  h, w = tf.minimum(h, shape[0]), tf.minimum(w, shape[1])
  offsets = tf.random.stateless_uniform([2], seeds[2], 0.0, 1.0)
  top = tf.cast(offsets[0] * tf.cast(shape[0] - h + 1, tf.float32), tf.int32)
  left = tf.cast(offsets[1] * tf.cast(shape[1] - w + 1, tf.float32), tf.int32)
  image = _resize(image[top:top + h, left:left + w], size, size)
  if flip:
    flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
  if randaugment_ops:
    image = randaugment(tf.cast(tf.round(image * 255.0), tf.uint8), seeds[4], randaugment_ops)
  return normalize(image)


def image_function(kind: str, size: int, **train_options):
  """A numpy callable `(uint8 HWC image, int seed [2]) -> float32 S x S x 3` for the loaders:
  `kind` is 'blip_train', 'blip_eval' or 'clip_eval' (the eval ones ignore the seed);
  `train_options` go to `blip_train` (scale, flip, randaugment_ops)."""
  if kind != 'blip_train':
    transform = preprocess.eval_transform(kind, size)
    return lambda image, seed: transform(image)
  fn = tf.function(lambda im, seed: blip_train(im, size, seed, **train_options),
                   input_signature=[tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([2], tf.int64)])
  return lambda image, seed: fn(image, tf.constant(seed, tf.int64)).numpy()
