"""BLIP ViT: position-embedding resize, other image sizes, rematerialisation, drop path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from blip_jax.convert import load_torch
from blip_jax.models import vit
from blip_jax.testing.torch_refs import OVERRIDES, assert_close, build_hf, images, nhwc


@pytest.mark.parametrize('old,new', [(14, 24), (24, 30), (24, 14), (3, 5)])
def test_resize_pos_embed_equals_torch_bicubic(old, new):
  """224 -> 384 -> 480 at patch 16 are grids 14 -> 24 -> 30."""
  g = torch.Generator().manual_seed(0)
  pos = torch.randn(1, 1 + old * old, 8, generator=g)
  grid = pos[:, 1:].reshape(1, old, old, 8).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, size=(new, new), mode='bicubic', align_corners=False)
  ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, new * new, 8)], dim=1)
  assert_close(vit.resize_pos_embed(pos.numpy(), new), ref, f'resize {old}->{new}')


def test_converted_model_at_larger_image_size_matches_hf_interpolation():
  """Loading at image_size=48 (grid 4 -> 6) equals HF's `interpolate_pos_encoding=True`."""
  hf = build_hf(transformers.BlipForImageTextRetrieval)
  model, cfg, report = load_torch(hf.state_dict(), task='retrieval', image_size=48, **OVERRIDES)
  assert cfg.vision.image_size == 48
  assert 'visual_encoder.pos_embed' in report.resized
  x = images(size=48)
  with torch.no_grad():
    ref = hf.vision_model(x, interpolate_pos_encoding=True).last_hidden_state
  assert_close(model.image_embeds(nhwc(x)), ref, 'vision states at 48 px')


def _tiny(**kw):
  return vit.ViTConfig(width=24, depth=3, num_heads=2, mlp_dim=37, patch_size=8, image_size=32, **kw)


def test_remat_changes_neither_outputs_nor_gradients():
  x = jnp.asarray(nhwc(images()))
  plain = vit.VisionTransformer(_tiny(), rngs=nnx.Rngs(0))
  remat = vit.VisionTransformer(_tiny(remat_layers=2), rngs=nnx.Rngs(0))

  def loss(model):
    return jnp.sum(model(x) ** 2)

  (l1, g1), (l2, g2) = (nnx.value_and_grad(loss)(m) for m in (plain, remat))
  assert_close(l2, np.asarray(l1), 'loss', atol=1e-3)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2)):
    assert_close(b[...], np.asarray(a[...]), f'gradient {path}', atol=1e-4)


def test_drop_path_follows_the_linear_depth_rule_and_drops_whole_samples():
  model = vit.VisionTransformer(_tiny(drop_path_rate=0.2), rngs=nnx.Rngs(0))
  np.testing.assert_allclose([b.drop_path.rate for b in model.blocks], [0.0, 0.1, 0.2])
  block = model.blocks[2]
  x = jax.random.normal(jax.random.key(0), (64, 5, 24))
  branch = block.attn(block.norm1(x))
  train_block = nnx.view(block, deterministic=False)
  out = train_block.drop_path(branch)
  kept = jnp.all(jnp.isclose(out, branch / 0.8, atol=1e-6), axis=(1, 2))
  dropped = jnp.all(out == 0, axis=(1, 2))
  assert bool(jnp.all(kept | dropped)), 'drop path must keep or drop each sample as a whole'
  assert 0 < int(dropped.sum()) < 64
  # Inference (the default) is deterministic.
  np.testing.assert_array_equal(block.drop_path(branch), branch)


def test_bad_image_size_and_shape_are_reported():
  with pytest.raises(ValueError, match='not divisible'):
    vit.ViTConfig(image_size=100, patch_size=16)
  model = vit.VisionTransformer(_tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'\[B, 32, 32, 3\]'):
    model(jnp.zeros((1, 3, 32, 32)))


def test_large_variant_sizes():
  cfg = vit.vit_config('large', image_size=384)
  assert dataclasses.astuple(cfg)[:4] == (1024, 24, 16, 4096) and cfg.drop_path_rate == 0.1
  assert cfg.grid == 24


def test_bfloat16_compute_keeps_float32_params():
  x = jnp.asarray(nhwc(images()))
  ref = vit.VisionTransformer(_tiny(), rngs=nnx.Rngs(0))
  bf16 = vit.VisionTransformer(_tiny(dtype='bfloat16'), rngs=nnx.Rngs(0))
  dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
  assert dtypes == {jnp.dtype('float32')}
  out = bf16(x)
  assert out.dtype == jnp.bfloat16
  # bf16 keeps ~3 significant digits: close to the fp32 result, but not equal to it.
  err = np.abs(np.asarray(out, np.float32) - np.asarray(ref(x))).max()
  assert 0 < err < 0.1, err
