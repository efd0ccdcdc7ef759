"""Image transforms against PIL / torchvision-style references."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from blip_jax.data import transforms as T

# PIL resizes in two passes, rounding and clipping to uint8 after each, so where bicubic
# overshoots it differs by up to a few grey levels; on average it agrees to a fraction of one.
PIXEL_TOL, MEAN_TOL = 5 / 255, 0.5 / 255


def _close(out, ref):
  diff = np.abs(out - ref)
  assert diff.max() <= PIXEL_TOL and diff.mean() <= MEAN_TOL, (diff.max() * 255, diff.mean() * 255)


@pytest.fixture(scope='module')
def image():
  rng = np.random.default_rng(0)
  noise = Image.fromarray((rng.random((75, 105, 3)) * 255).astype(np.uint8))
  return np.asarray(noise.resize((420, 301), Image.BICUBIC))  # smooth content, odd height


def _pixels(normalised):
  return np.asarray(normalised) * np.array(T.STD) + np.array(T.MEAN)


@pytest.mark.parametrize('size', [384, 224, 96])  # up- and downsampling
def test_blip_eval_matches_pil_bicubic_squash(image, size):
  ref = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)) / 255
  _close(_pixels(T.blip_eval(image, size)), ref)


def test_clip_eval_is_shorter_side_resize_then_center_crop(image):
  size = 96
  h, w = image.shape[:2]
  new_w = size * w // h  # torchvision truncates the longer side
  resized = Image.fromarray(image).resize((new_w, size), Image.BICUBIC)
  left = int(round((new_w - size) / 2))
  ref = np.asarray(resized)[:, left:left + size] / 255
  out = _pixels(T.clip_eval(image, size))
  assert out.shape == (size, size, 3)
  _close(out, ref)


def test_normalize_constants():
  white = T.normalize(np.full((1, 1, 3), 255, np.uint8)).numpy()[0, 0]
  np.testing.assert_allclose(white, (1 - np.array(T.MEAN)) / np.array(T.STD), rtol=1e-6)


def test_blip_train_is_deterministic_and_covers_the_image_at_full_scale(image):
  seed = tf.constant([1, 2])
  a, b = T.blip_train(image, 64, seed), T.blip_train(image, 64, seed)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (64, 64, 3)
  assert not np.array_equal(a, T.blip_train(image, 64, tf.constant([3, 4])))
  # With the whole image as the only possible crop, the output is the squash resize or its mirror.
  h, w = image.shape[:2]
  full = T.blip_eval(image, 64).numpy()
  outs = [T.blip_train(image, 64, tf.constant([s, 0]), scale=(1.0, 1.0), ratio=(w / h, w / h)).numpy()
          for s in range(8)]
  for out in outs:
    assert np.allclose(out, full, atol=1e-4) or np.allclose(out, full[:, ::-1], atol=1e-4)
  assert any(np.allclose(o, full[:, ::-1], atol=1e-4) for o in outs)  # flips happen
  assert any(np.allclose(o, full, atol=1e-4) for o in outs)
