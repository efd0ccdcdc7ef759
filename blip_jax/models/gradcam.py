"""Grad-CAM of BLIP's image-text matching, as LAVIS `compute_gradcam` (BLIP's demo): at one
cross-attention layer of the multimodal text encoder, the attention probabilities from each text
token to the image patches times the positive part of their gradient of the ITM match logit,
averaged over the heads, on the patch grid.

The probabilities are read by a probe the layer attends through (`BertSelfAttention.probe`):
softmax as `dot_product_attention` computes it, then `probs + delta` attends, so the gradient
with respect to `delta` at 0 is the gradient with respect to the probabilities (LAVIS's
`get_attn_gradients`), from one `jax.grad`, inside `jit` and without hooks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax.models import layers


class _Probe:
  def __init__(self):
    self.delta = self.probs = None

  def __call__(self, q, k, v, bias):
    if isinstance(k, layers.CachedKV) or k.shape[0] != q.shape[0]:
      raise ValueError('Grad-CAM reads one image per text (no cached or shared keys)')
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    if bias is not None:
      logits = logits + bias
    self.probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum('bhqk,bkhd->bqhd', (self.probs + self.delta).astype(v.dtype), v)


def itm_gradcam(model, image_embeds, input_ids, attention_mask, *, layer: int = 6):
  """Grad-CAM maps of image-text pairs (text i with image i) at cross-attention `layer` (LAVIS's
  `block_num`, default 6). Returns (maps [B, T + 1, g, g], itm_logits [B, 2]); maps are LAVIS's
  rows: 0 the `[ENC]` token, 1 the mean over the text's words (its tokens but the first and the
  last, `[SEP]`), then 1 + t for token t = 1 ... T - 1 (zero where the mask is 0)."""
  encoder = model.text_encoder.encoder.layer
  if not 0 <= layer < len(encoder):
    raise ValueError(f'Grad-CAM layer {layer}: the text encoder has layers 0 ... {len(encoder) - 1}')
  attention = encoder[layer].crossattention.self
  (b, t), grid = input_ids.shape, model.config.vision.grid
  delta = jnp.zeros((b, model.config.text.num_heads, t, image_embeds.shape[1]), jnp.float32)

  probe = _Probe()

  def match(delta):
    probe.delta = delta
    logits = model.itm_logits(image_embeds, input_ids, attention_mask)
    return logits[:, 1].sum(), (probe.probs, logits)

  # Set outside `grad`: flax lets a module change only at the trace level that holds it.
  attention.probe = probe
  try:
    grads, (probs, logits) = jax.grad(match, has_aux=True)(delta)
  finally:
    attention.probe = None
  mask = attention_mask.astype(jnp.float32)[:, None, :, None]
  # Patches only (the image's [CLS] state, column 0, is dropped), as LAVIS.
  cams = (probs[..., 1:] * mask * jnp.maximum(grads[..., 1:], 0) * mask).mean(axis=1).reshape(b, t, grid, grid)
  words = attention_mask.sum(-1) - 2
  in_words = (jnp.arange(1, t) <= words[:, None]).astype(cams.dtype)  # tokens 1 ... words
  mean = (cams[:, 1:] * in_words[:, :, None, None]).sum(1) / jnp.maximum(words, 1)[:, None, None]
  return jnp.concatenate([cams[:, :1], mean[:, None], cams[:, 1:]], axis=1), logits
