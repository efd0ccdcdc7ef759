"""Image transforms against PIL / torchvision-style references."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from blip_jax.data import preprocess as P
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
  return np.asarray(normalised) * np.array(P.STD) + np.array(P.MEAN)


@pytest.mark.parametrize('size', [384, 224, 96])  # up- and downsampling
def test_blip_eval_matches_pil_bicubic_squash(image, size):
  ref = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)) / 255
  _close(_pixels(P.blip_eval(image, size)), ref)


@pytest.mark.parametrize('shape,size', [((301, 420), 384), ((480, 640), 224), ((17, 33), 32), ((1000, 37), 96),
                                        ((64, 64), 7)])
def test_numpy_resize_equals_tensorflows(shape, size):
  """The eval transforms (numpy, shared with inference) and the training transform (TensorFlow's
  `tf.image.resize`) use one filter: their outputs agree to float32 rounding of the sums."""
  img = (np.random.default_rng(shape[0]).random((*shape, 3)) * 255).astype(np.uint8)
  ref = tf.clip_by_value(tf.image.resize(img.astype(np.float32) / 255, (size, size), 'bicubic', antialias=True), 0, 1)
  np.testing.assert_allclose(P.resize(img, size, size), ref.numpy(), atol=6e-5)
  # after normalisation (divided by std ~0.27): 2e-4, 0.06 grey levels at most
  np.testing.assert_allclose(P.blip_eval(img, size), T.normalize(ref).numpy(), atol=2.5e-4)


def test_clip_eval_is_shorter_side_resize_then_center_crop(image):
  size = 96
  h, w = image.shape[:2]
  new_w = size * w // h  # torchvision truncates the longer side
  resized = Image.fromarray(image).resize((new_w, size), Image.BICUBIC)
  left = int(round((new_w - size) / 2))
  ref = np.asarray(resized)[:, left:left + size] / 255
  out = _pixels(P.clip_eval(image, size))
  assert out.shape == (size, size, 3)
  _close(out, ref)


def test_normalize_constants():
  white = T.normalize(np.full((1, 1, 3), 255, np.uint8)).numpy()[0, 0]
  np.testing.assert_allclose(white, (1 - np.array(P.MEAN)) / np.array(P.STD), rtol=1e-6)
  np.testing.assert_allclose(P.normalize(np.full((1, 1, 3), 255, np.uint8))[0, 0], white, rtol=1e-6)


def test_blip_train_is_deterministic_and_covers_the_image_at_full_scale(image):
  seed = tf.constant([1, 2])
  a, b = T.blip_train(image, 64, seed), T.blip_train(image, 64, seed)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (64, 64, 3)
  assert not np.array_equal(a, T.blip_train(image, 64, tf.constant([3, 4])))
  # With the whole image as the only possible crop, the output is the squash resize or its mirror.
  h, w = image.shape[:2]
  full = P.blip_eval(image, 64)
  outs = [T.blip_train(image, 64, tf.constant([s, 0]), scale=(1.0, 1.0), ratio=(w / h, w / h),
                          randaugment_ops=0).numpy()
          for s in range(8)]
  for out in outs:
    assert np.allclose(out, full, atol=1e-4) or np.allclose(out, full[:, ::-1], atol=1e-4)
  assert any(np.allclose(o, full[:, ::-1], atol=1e-4) for o in outs)  # flips happen
  assert any(np.allclose(o, full, atol=1e-4) for o in outs)


# ------------------------------------------------------------------------------ RandAugment

from PIL import ImageOps  # noqa: E402

from blip_jax.data import randaugment as RA  # noqa: E402


def _scene(seed=0, size=24):
  rng = np.random.default_rng(seed)
  img = rng.integers(40, 200, (size, size, 3), dtype=np.uint8)
  img[4:12, 6:18] = (250, 20, 90)
  return img


def test_autocontrast_and_equalize_match_pil():
  img = _scene()
  auto = RA.apply_op(tf.constant(img), 'AutoContrast').numpy()
  np.testing.assert_allclose(auto, np.asarray(ImageOps.autocontrast(Image.fromarray(img))), atol=1)
  eq = RA.apply_op(tf.constant(img), 'Equalize').numpy()
  np.testing.assert_array_equal(eq, np.asarray(ImageOps.equalize(Image.fromarray(img))))


def test_geometric_ops_follow_their_definitions():
  img = _scene(1)
  # TranslateX by +5 px (magnitude 5 of 10 -> 5 px): content moves left by 5, grey fills the right.
  moved = RA.apply_op(tf.constant(img), 'TranslateX', 5.0, 1.0).numpy()
  np.testing.assert_array_equal(moved[:, :-5], img[:, 5:])
  assert (moved[:, -5:] == 128).all()
  down = RA.apply_op(tf.constant(img), 'TranslateY', 5.0, -1.0).numpy()
  np.testing.assert_array_equal(down[5:], img[:-5])
  # ShearX 0.15: output (x, y) reads input (x - 0.15 y, y); row 0 is unchanged.
  sheared = RA.apply_op(tf.constant(img), 'ShearX', 5.0, 1.0).numpy()
  np.testing.assert_array_equal(sheared[0], img[0])
  # Rotating by 15 degrees keeps the centre pixel and fills the corners with grey.
  rot = RA.apply_op(tf.constant(img), 'Rotate', 5.0, 1.0).numpy()
  assert (rot[0, 0] == 128).all() and np.abs(rot[12, 12].astype(int) - img[12, 12]).max() <= 40
  # At magnitude 5, Brightness and Sharpness have factor 1.0: no change (as in the originals).
  for name in ('Brightness', 'Sharpness', 'Identity'):
    np.testing.assert_array_equal(RA.apply_op(tf.constant(img), name).numpy(), img)
  np.testing.assert_array_equal(RA.apply_op(tf.constant(img), 'Brightness', 0.0).numpy(),
                                (img * 0.1).astype(np.uint8))


def test_randaugment_is_seeded_and_applies_about_one_op_per_image():
  img = tf.constant(_scene(2))
  out = [RA.randaugment(img, tf.constant([0, s], tf.int64)).numpy() for s in range(60)]
  again = [RA.randaugment(img, tf.constant([0, s], tf.int64)).numpy() for s in range(5)]
  assert all(np.array_equal(a, b) for a, b in zip(out, again))
  unchanged = np.mean([np.array_equal(o, img.numpy()) for o in out])
  # P(unchanged) = P(no op applied or only identity-like ops) = (1/2 + 1/2 * 3/10) ** 2 = 0.42.
  assert 0.25 < unchanged < 0.6 and all(o.dtype == np.uint8 and o.shape == (24, 24, 3) for o in out)
