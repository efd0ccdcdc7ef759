"""Training objectives written on the global batch (REFERENCE.md section 5).

Under `jax.jit` with the batch sharded over a mesh, "the whole batch" is the global batch, so
these functions are the originals' `concat_all_gather` / `negative_all_rank` semantics with no
special case for one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax.models.layers import MASK_VALUE


def positives(batch_size: int, image_ids=None):
  """[B, B] boolean: pairs that match (the diagonal, or every pair with the same image id)."""
  if image_ids is None:
    return jnp.eye(batch_size, dtype=bool)
  image_ids = jnp.asarray(image_ids).reshape(-1)
  return image_ids[:, None] == image_ids[None, :]


def soft_cross_entropy(logits, targets):
  """mean over rows of -sum(log_softmax(logits) * targets)."""
  return -(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1) * targets).sum(-1).mean()


def itc_loss_smoothed(sim_i2t, sim_t2i, *, image_ids=None, label_smoothing: float = 0.1):
  """BLIP-2's ITC: cross-entropy with label smoothing against the positives (normalised per row;
  the diagonal without image ids), averaged over both directions."""
  pos = positives(sim_i2t.shape[0], image_ids).astype(jnp.float32)
  targets = pos / pos.sum(1, keepdims=True)
  targets = (1 - label_smoothing) * targets + label_smoothing / targets.shape[1]
  return (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2


def sample_hard_negatives(rng, sim_i2t, sim_t2i, positive_mask):
  """One negative image per text and one negative text per image, drawn from
  softmax(similarity) with the positives masked out (the originals' hard-negative mining).

  Returns (negative image index per text [B], negative text index per image [B]).
  """
  rng_image, rng_text = jax.random.split(rng)
  sim_i2t = jax.lax.stop_gradient(jnp.where(positive_mask, MASK_VALUE, sim_i2t))
  sim_t2i = jax.lax.stop_gradient(jnp.where(positive_mask, MASK_VALUE, sim_t2i))
  neg_image = jax.random.categorical(rng_image, sim_t2i, axis=-1)
  neg_text = jax.random.categorical(rng_text, sim_i2t, axis=-1)
  return neg_image, neg_text


def itm_loss_with_negatives(itm_logits_fn, image_embeds, input_ids, attention_mask, neg_image, neg_text, *,
                            share_image_keys: bool | None = None):
  """ITM over [positives (B); (negative image, text) (B); (image, negative text) (B)] with labels
  [1]*B + [0]*2B, plain cross-entropy. `itm_logits_fn(image_embeds, ids, mask, image_rows)` ->
  [N, 2], pair i reading image `image_rows[i]`.

  `share_image_keys` (default: on a single device): the 3B pairs read the B images'
  cross-attention keys/values by index, so the image-side projections run once per image (a
  third of the originals' work on their concatenated image copies). Otherwise the image states are
  copied per pair as in the originals: on a mesh the index would gather every layer's keys and
  values across devices, where the copy moves the image states once.
  """
  b = input_ids.shape[0]
  if share_image_keys is None:
    share_image_keys = jax.device_count() == 1
  ids = jnp.concatenate([input_ids, input_ids, input_ids[neg_text]], axis=0)
  mask = jnp.concatenate([attention_mask, attention_mask, attention_mask[neg_text]], axis=0)
  if share_image_keys:
    own = jnp.arange(b)
    logits = itm_logits_fn(image_embeds, ids, mask, jnp.concatenate([own, jnp.asarray(neg_image), own]))
  else:
    images = jnp.concatenate([image_embeds, image_embeds[neg_image], image_embeds], axis=0)
    logits = itm_logits_fn(images, ids, mask, None)
  labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
  return soft_cross_entropy(logits, jax.nn.one_hot(labels, 2)), logits


def blip2_stage1_losses(model, image_embeds, input_ids, attention_mask, *, rng=None, negatives=None,
                        image_ids=None):
  """BLIP-2 stage 1 (LAVIS `Blip2Qformer.forward`): ITC + ITM + ITG in one call.

  Give `rng` to sample the hard negatives, or `negatives=(neg_image, neg_text)` to fix them.
  Returns {'itc', 'itm', 'itg', 'loss'} (loss = their sum).
  """
  image_feat = model.image_features(image_embeds)
  text_feat = model.text_features(input_ids, attention_mask)
  temp = model.temp[...]  # LAVIS's BLIP-2 divides by the raw temp (BLIP clamps it; BLIP-2 does not)
  sim_i2t = model.similarity(image_feat, text_feat) / temp
  sim_t2i = jnp.einsum('te,iqe->tiq', text_feat, image_feat).max(-1) / temp
  itc = itc_loss_smoothed(sim_i2t, sim_t2i, image_ids=image_ids)
  if negatives is None:
    if rng is None:
      raise ValueError('pass rng (to sample hard negatives) or negatives=(neg_image, neg_text)')
    negatives = sample_hard_negatives(rng, sim_i2t, sim_t2i, positives(sim_i2t.shape[0], image_ids))
  itm, _ = itm_loss_with_negatives(model.itm_logits, image_embeds, input_ids, attention_mask, *negatives)
  itg = model.itg_loss(image_embeds, input_ids, attention_mask)
  return {'itc': itc, 'itm': itm, 'itg': itg, 'loss': itc + itm + itg}
