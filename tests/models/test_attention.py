"""Attention's implementation choice (`layers.attention_path`) and the fused path: on NVIDIA GPUs
in bf16 cuDNN's flash attention through `jax.nn.dot_product_attention`, which must compute the
project's formula with its masks and shared keys/values. On CPU the same call with the XLA
implementation stands in for cuDNN's (the fused path's argument handling is what is tested);
with a GPU the cuDNN kernel itself is compared too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blip_jax.models import layers

H200 = dict(backend='gpu', device_kind='NVIDIA H200')


def _qkv(b=2, tq=12, tk=12, heads=4, dim=64, dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (b, tq, heads, dim), dtype)
  k = jax.random.normal(keys[1], (b, tk, heads, dim), dtype)
  v = jax.random.normal(keys[2], (b, tk, heads, dim), dtype)
  return q, k, v


def test_the_path_follows_backend_dtype_dropout_and_head_size():
  bf16 = _qkv(dtype=jnp.bfloat16)
  fp32 = _qkv()
  assert layers.attention_path(bf16[0], bf16[1], **H200) == 'cudnn'
  assert layers.attention_path(bf16[0].astype(jnp.float16), bf16[1], **H200) == 'cudnn'
  assert layers.attention_path(fp32[0], fp32[1], **H200) == 'xla'  # fp32: cuDNN's flash kernel is bf16 / fp16
  assert layers.attention_path(bf16[0], bf16[1], cached=True, **H200) == 'xla'  # heads-major decoding caches
  dropout = nnx.Dropout(0.1, deterministic=False, rngs=nnx.Rngs(0))
  assert layers.attention_path(bf16[0], bf16[1], dropout, **H200) == 'xla'  # no dropout on its probabilities
  assert layers.attention_path(bf16[0], bf16[1], nnx.Dropout(0.1, deterministic=True, rngs=nnx.Rngs(0)),
                               **H200) == 'cudnn'  # evaluation: dropout off
  eva = _qkv(dim=88, dtype=jnp.bfloat16)  # EVA ViT-g: 16 heads of 88
  assert layers.attention_path(eva[0], eva[1], **H200) == 'cudnn'
  for dim in (36, 256):
    q = _qkv(dim=dim, dtype=jnp.bfloat16)
    assert layers.attention_path(q[0], q[1], **H200) == 'xla', dim
  assert layers.attention_path(bf16[0], bf16[1], backend='gpu', device_kind='AMD Instinct MI300X') == 'xla'
  assert layers.attention_path(bf16[0], bf16[1], backend='tpu') == 'xla'
  big = _qkv(b=8, tq=577, tk=577, heads=12)  # ViT-B/16 at 384 px: 128 MiB of scores
  assert layers.attention_path(big[0], big[1], backend='cpu') == 'by_head'
  assert layers.attention_path(fp32[0], fp32[1], backend='cpu') == 'xla'
  assert layers.attention_path(big[0], big[1], dropout, backend='cpu') == 'xla'


def _formula(q, k, v, bias):
  logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32)) * q.shape[-1] ** -0.5
  if bias is not None:
    logits = logits + bias
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, -1), v.astype(jnp.float32))


def _masks(b, tq, tk, heads):
  padding = layers.mask_to_bias(jnp.arange(tk)[None] < jnp.asarray([tk, tk - 5])[:, None])  # [B, 1, 1, Tk]
  causal = layers.mask_to_bias(layers.make_attn_mask(jnp.ones((b, tk)), jnp.ones((b, tk))))  # [B, 1, T, T]
  per_head = jax.random.normal(jax.random.key(7), (b, heads, tq, tk))
  return {'none': None, 'padding': padding, 'causal': causal if tq == tk else None, 'per_head': per_head}


@pytest.fixture
def fused_on_cpu(monkeypatch):
  """`dot_product_attention` taking its fused path, with XLA's implementation standing in for cuDNN's."""
  monkeypatch.setattr(layers, 'attention_path', lambda *a, **k: 'cudnn')
  fused = layers.fused_attention
  monkeypatch.setattr(layers, 'fused_attention', lambda q, k, v, bias, scale, impl: fused(q, k, v, bias, scale, 'xla'))


@pytest.mark.parametrize('mask', ['none', 'padding', 'causal', 'per_head'])
def test_fused_path_computes_the_formula(fused_on_cpu, mask):
  q, k, v = _qkv(b=2, tq=12, tk=12)
  bias = _masks(2, 12, 12, 4)[mask]
  ref = _formula(q, k, v, bias)
  layers.PATHS_USED.clear()
  out = layers.dot_product_attention(q, k, v, bias)
  assert layers.PATHS_USED == {'xla'}  # what the stand-in reports; on a GPU, 'cudnn'
  np.testing.assert_allclose(out, ref, atol=2e-6)


def test_fused_path_with_shared_keys_and_bf16(fused_on_cpu):
  # Three beams per image share its cross-attention keys/values; padded image-side keys.
  q, _, _ = _qkv(b=6, tq=5, tk=9, seed=1)
  _, k, v = _qkv(b=2, tq=5, tk=9, seed=2)
  bias = _masks(2, 5, 9, 4)['padding']
  out = layers.dot_product_attention(q, k, v, bias)
  ref = _formula(q, jnp.repeat(k, 3, 0), jnp.repeat(v, 3, 0), jnp.repeat(bias, 3, 0))
  np.testing.assert_allclose(out, ref, atol=2e-6)
  q16, k16, v16 = (x.astype(jnp.bfloat16) for x in _qkv(seed=3))
  out16 = layers.dot_product_attention(q16, k16, v16, _masks(2, 12, 12, 4)['padding'])
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(out16.astype(jnp.float32), _formula(q16, k16, v16, _masks(2, 12, 12, 4)['padding']),
                             atol=3e-2)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN flash attention runs on NVIDIA GPUs only')
@pytest.mark.parametrize('mask', ['none', 'padding', 'causal'])
def test_cudnn_flash_attention_computes_the_formula(mask):
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(b=4, tq=128, tk=128, heads=8, dim=64))
  bias = _masks(4, 128, 128, 8)[mask]
  layers.PATHS_USED.clear()
  out = jax.jit(layers.dot_product_attention)(q, k, v, bias)
  assert layers.PATHS_USED == {'cudnn'}
  np.testing.assert_allclose(out.astype(jnp.float32), _formula(q, k, v, bias), atol=3e-2)
