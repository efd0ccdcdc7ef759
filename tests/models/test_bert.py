"""MED BERT pieces that have no single HF call to compare with: the decoding cache, embeddings
input, masks, the attention function's layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from blip_jax.convert import load_torch
from blip_jax.models import layers
from blip_jax.testing.torch_refs import DEC, OVERRIDES, assert_close, build_hf, images, nhwc


def _captioner():
  hf = build_hf(transformers.BlipForConditionalGeneration)
  model, _, _ = load_torch(hf.state_dict(), task='caption', **OVERRIDES)
  return hf, model


def test_incremental_decoding_reproduces_full_sequence_logits():
  hf, model = _captioner()
  embeds = model.image_embeds(nhwc(images()))
  ids = np.array([[DEC, 5, 6, 7, 8, 9], [DEC, 10, 11, 12, 13, 14]])
  mask = np.ones_like(ids)
  full = model.text_decoder(ids, mask, embeds)
  with torch.no_grad():
    ref = hf.text_decoder(torch.tensor(ids), attention_mask=torch.tensor(mask),
                          encoder_hidden_states=torch.tensor(np.asarray(embeds))).logits
  assert_close(full, ref, 'full-sequence logits')
  max_len = 8  # longer than the sequence: unused cache slots must not leak into attention
  slot_mask = np.zeros((2, max_len), np.int32)
  slot_mask[:, :ids.shape[1]] = 1
  cache = model.text_decoder.init_cache(2, max_len, embeds)
  # A 2-token prompt in one call, then one token at a time, under jit as generation runs it.
  step = jax.jit(lambda tok, cache: model.text_decoder.decode(tok, slot_mask, cache))
  pieces = []
  logits, cache = step(ids[:, :2], cache)
  pieces.append(logits)
  for t in range(2, ids.shape[1]):
    logits, cache = step(ids[:, t:t + 1], cache)
    pieces.append(logits)
  assert int(cache['index']) == ids.shape[1]
  assert_close(jnp.concatenate(pieces, axis=1), full, 'cached decoding vs full sequence')


def test_inputs_embeds_equal_token_ids():
  _, model = _captioner()
  bert = model.text_decoder.bert
  ids = np.array([[DEC, 5, 6, 7]])
  embeds = model.image_embeds(nhwc(images(batch=1)))
  from_ids = bert(ids, mode='multimodal', encoder_hidden_states=embeds, is_decoder=True)
  word = bert.embeddings.word_embeddings(jnp.asarray(ids))
  from_embeds = bert(inputs_embeds=word, mode='multimodal', encoder_hidden_states=embeds, is_decoder=True)
  assert_close(from_embeds, np.asarray(from_ids), 'inputs_embeds path')


def test_encoder_attention_mask_hides_padded_encoder_states():
  """Masked encoder positions must not matter: garbage there leaves the output unchanged."""
  _, model = _captioner()
  embeds = np.asarray(model.image_embeds(nhwc(images(batch=1))))
  ids = np.array([[DEC, 5, 6]])
  enc_mask = np.ones(embeds.shape[:2], np.int32)
  enc_mask[:, -3:] = 0
  noisy = embeds.copy()
  noisy[:, -3:] = 100.0
  clean = model.text_decoder(ids, None, embeds[:, :-3])
  masked = model.text_decoder(ids, None, noisy, enc_mask)
  assert_close(masked, np.asarray(clean), 'masked encoder states')


def test_make_attn_mask_full_causal_and_prefix():
  valid = np.array([[1, 1, 1, 0]])
  full = layers.make_attn_mask(valid, np.zeros((1, 4)))
  causal = layers.make_attn_mask(valid, np.ones((1, 4)))
  prefix = layers.make_attn_mask(valid, np.array([[0, 0, 1, 1]]))
  np.testing.assert_array_equal(full[0], np.array([[1, 1, 1, 0]] * 4, bool))
  np.testing.assert_array_equal(causal[0], np.tril(np.ones((4, 4), bool)) & valid.astype(bool))
  np.testing.assert_array_equal(prefix[0], np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                                                     [1, 1, 1, 0]], bool))


def test_sequences_share_the_cross_attention_of_their_image():
  """A cache of 3 sequences per image reading one copy of the image's cross-attention keys/values
  (as beam search and sampling use it) gives each sequence the logits of a cache built from
  the image states repeated per sequence; also with a mask on the encoder states."""
  _, model = _captioner()
  embeds = np.asarray(model.image_embeds(nhwc(images(batch=2))))
  enc_mask = np.ones(embeds.shape[:2], np.int32)
  enc_mask[1, -4:] = 0
  copies, max_len = 3, 5
  ids = np.random.default_rng(0).integers(5, 90, size=(2 * copies, max_len))
  ids[:, 0] = DEC
  slot_mask = np.ones((2 * copies, max_len), np.int32)
  decoder = model.text_decoder
  step = jax.jit(lambda tok, cache: decoder.decode(tok, slot_mask, cache))
  shared = decoder.init_cache(2 * copies, max_len, embeds, enc_mask)
  assert shared['shared']['cross_kv'][0][0].k.shape[0] == 2
  repeated = decoder.init_cache(2 * copies, max_len, np.repeat(embeds, copies, 0), np.repeat(enc_mask, copies, 0))
  for t in range(max_len):
    ours, shared = step(ids[:, t:t + 1], shared)
    ref, repeated = step(ids[:, t:t + 1], repeated)
    assert_close(ours, np.asarray(ref), f'shared cross-attention, step {t}')


def test_grouped_and_cached_attention_equal_repeated_keys():
  """`dot_product_attention` with G query rows per key/value row, keys/values as given or as
  `CachedKV`, and a bias per key/value row or per query row, equals attention to repeated keys."""
  rng = np.random.default_rng(0)
  b, g, tq, tk, h, d = 2, 3, 4, 7, 2, 5
  q = jnp.asarray(rng.normal(size=(b * g, tq, h, d)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, tk, h, d)), jnp.float32) for _ in range(2))
  row_bias = layers.mask_to_bias(jnp.asarray(rng.random((b, tk)) > 0.3))  # [B, 1, 1, Tk]
  query_bias = jnp.asarray(rng.normal(size=(b * g, 1, tq, tk)), jnp.float32)
  for bias, repeated_bias in ((None, None), (row_bias, jnp.repeat(row_bias, g, 0)), (query_bias, query_bias)):
    ref = layers.dot_product_attention(q, jnp.repeat(k, g, 0), jnp.repeat(v, g, 0), repeated_bias)
    assert_close(layers.dot_product_attention(q, k, v, bias), np.asarray(ref), 'grouped attention')
    assert_close(layers.dot_product_attention(q, layers.CachedKV.of(k, v), None, bias), np.asarray(ref),
                 'grouped attention, cached layout')


def test_head_at_a_time_attention_equals_the_formula(monkeypatch):
  """The CPU path that loops over heads (scores above `layers.HEAD_AT_A_TIME_BYTES`) gives the
  softmax formula's output (float64 numpy) and the one-pass path's gradients, for every bias
  layout the models pass."""
  rng = np.random.default_rng(0)
  b, tq, tk, h, d = 2, 5, 7, 3, 4
  q = jnp.asarray(rng.normal(size=(b, tq, h, d)), jnp.float32)
  k, v, w = (jnp.asarray(rng.normal(size=(b, n, h, d)), jnp.float32) for n in (tk, tk, tq))
  biases = {'none': None, 'per key': layers.mask_to_bias(jnp.asarray(rng.random((b, tk)) > 0.3)),
            'per query': jnp.asarray(rng.normal(size=(b, 1, tq, tk)), jnp.float32),
            'per head': jnp.asarray(rng.normal(size=(b, h, tq, tk)), jnp.float32)}

  def formula(bias):
    logits = np.einsum('bqhd,bkhd->bhqk', *(np.asarray(x, np.float64) for x in (q, k))) / np.sqrt(d)
    if bias is not None:
      logits = logits + np.asarray(bias, np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum('bhqk,bkhd->bqhd', probs, np.asarray(v, np.float64))

  def attend(bias, threshold):
    monkeypatch.setattr(layers, 'HEAD_AT_A_TIME_BYTES', threshold)
    f = lambda q, k, v: layers.dot_product_attention(q, k, v, bias)
    looped = 'scan' in str(jax.make_jaxpr(f)(q, k, v))
    grads = jax.grad(lambda *qkv: (f(*qkv) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    return looped, f(q, k, v), grads

  for name, bias in biases.items():
    looped, out, grads = attend(bias, 0)
    one_pass, _, ref_grads = attend(bias, 2**62)
    assert looped and not one_pass
    assert_close(out, formula(bias), f'head-at-a-time attention, bias {name}')
    for x, grad, ref in zip('qkv', grads, ref_grads):
      assert_close(grad, np.asarray(ref), f'head-at-a-time d/d{x}, bias {name}')
