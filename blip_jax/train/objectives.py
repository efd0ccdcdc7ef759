"""Every training objective of the originals, one `Objective` each (REFERENCE.md section 5).

An objective says which model it trains (family + task), which examples it reads
(`blip_jax.data.examples` kinds), which parameters stay frozen, and how the loss of a global
batch is computed. Under `jax.jit` with the batch sharded over the mesh, "the batch" in every
loss below is the global batch: the originals' `concat_all_gather` / `negative_all_rank`.

| objective      | model (family, task)               | loss                                                   |
|----------------|------------------------------------|--------------------------------------------------------|
| `retrieval`    | blip retrieval (+ momentum, queues) | ITC (same-id positives, distillation alpha) + ITM (hard negatives) |
| `pretrain`     | blip pretrain                      | ITC + ITM + LM (tied decoder)                          |
| `caption`      | blip caption                       | LM with label smoothing, the model's prompt ignored    |
| `vqa`          | blip vqa                           | VQA-score-weighted answer LM                           |
| `nlvr`         | blip nlvr                          | cross-entropy true/false                               |
| `blip2_stage1` | blip2 stage1                       | ITC + ITM + ITG, image encoder frozen                  |
| `blip2_stage2` | blip2 stage2                       | LM on the text, image encoder and OPT frozen           |
| `clip`         | clip contrastive                   | symmetric InfoNCE, learnable logit scale               |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from blip_jax import losses
from blip_jax.models import layers
from blip_jax.models.bert import lm_loss


@dataclasses.dataclass(frozen=True)
class Objective:
  name: str
  family: str  # blip_jax.registry.FAMILIES key
  task: str  # the family's model task to build
  examples: str  # blip_jax.data.examples.KINDS
  loss: Callable  # (model, batch, rng, alpha) -> (loss, {name: value})
  frozen: tuple[str, ...] = ()  # parameter path regexes that never train
  momentum: bool = False  # momentum encoders + queues (update before, enqueue inside the loss)
  # Captions are the model's `config.prompt` + caption, the prompt ignored by the loss (captioning).
  prompted: bool = False
  config_fields: dict[str, Any] = dataclasses.field(default_factory=dict)  # set on the model config


# ---------------------------------------------------------------------------------------- BLIP


def _enqueue(model, image_feat_m, text_feat_m, image_ids):
  """The originals' `_dequeue_and_enqueue`: write the (global) batch at the pointer."""
  ptr_var = getattr(model, model.queue_pointer_name)
  ptr = ptr_var[...][0]
  write = lambda queue, x: jax.lax.dynamic_update_slice(queue, x.T.astype(queue.dtype), (0, ptr))
  model.image_queue[...] = write(model.image_queue[...], image_feat_m)
  model.text_queue[...] = write(model.text_queue[...], text_feat_m)
  if model.with_idx_queue:
    model.idx_queue[...] = write(model.idx_queue[...], image_ids[:, None])
  ptr_var[...] = (ptr_var[...] + image_feat_m.shape[0]) % model.config.queue_size
  model.queue_filled[...] = jnp.minimum(model.queue_filled[...] + image_feat_m.shape[0], model.config.queue_size)


def itc_with_momentum(model, images, image_embeds, text_ids, text_mask, alpha, image_ids=None):
  """ITC against momentum features and the queues, with distillation targets
  `alpha * softmax(sim_m) + (1 - alpha) * positives`; enqueues the momentum features.

  Returns (loss, image_feat, text_feat). Positives: the diagonal (pretraining) or every pair
  with the same image id, the queue's ids included (retrieval), normalised per row. Queue slots
  not yet filled with a real feature (`model.queue_filled`) are masked out of both softmaxes.
  """
  image_feat = model.image_features(image_embeds)
  text_feat = model.text_features(model.text_embeds(text_ids, text_mask))
  stop = jax.lax.stop_gradient
  image_feat_m = stop(layers.l2_normalize(model.vision_proj_m(model.visual_encoder_m(images)[:, 0])))
  text_feat_m = stop(layers.l2_normalize(
      model.text_proj_m(model.text_encoder_m(text_ids, text_mask, mode='text')[:, 0])))
  image_all = jnp.concatenate([image_feat_m, model.image_queue[...].T], 0)
  text_all = jnp.concatenate([text_feat_m, model.text_queue[...].T], 0)
  temp = model.temperature()
  b = image_feat.shape[0]
  if image_ids is None:
    targets = jnp.eye(b, image_all.shape[0])
  else:
    ids_all = jnp.concatenate([image_ids, model.idx_queue[...][0]])
    pos = (image_ids[:, None] == ids_all[None, :]).astype(jnp.float32)
    targets = pos / pos.sum(1, keepdims=True)
  real = jnp.concatenate([jnp.ones((b,), bool), jnp.arange(model.config.queue_size) < model.queue_filled[...][0]])
  # A large finite logit, not -inf: the masked slots' targets are 0, and 0 * log(0) must stay 0.
  sims = lambda queries, keys: jnp.where(real, queries @ keys.T / temp, -1e9)
  targets_i2t = alpha * jax.nn.softmax(stop(sims(image_feat_m, text_all)), -1) + (1 - alpha) * targets
  targets_t2i = alpha * jax.nn.softmax(stop(sims(text_feat_m, image_all)), -1) + (1 - alpha) * targets
  loss = (losses.soft_cross_entropy(sims(image_feat, text_all), targets_i2t)
          + losses.soft_cross_entropy(sims(text_feat, image_all), targets_t2i)) / 2
  _enqueue(model, image_feat_m, text_feat_m, image_ids)
  return loss, image_feat, text_feat


def itm_hard_negatives(model, rng, image_embeds, image_feat, text_feat, text_ids, text_mask, image_ids=None):
  """ITM over positives and one hard negative per image and per text from the whole batch."""
  temp = model.temperature()
  sim_i2t = image_feat @ text_feat.T / temp
  pos = losses.positives(image_feat.shape[0], image_ids)
  neg_image, neg_text = losses.sample_hard_negatives(rng, sim_i2t, sim_i2t.T, pos)
  loss, _ = losses.itm_loss_with_negatives(model.itm_logits, image_embeds, text_ids, text_mask,
                                               neg_image, neg_text)
  return loss


def retrieval_loss(model, batch, rng, alpha):
  images, ids, mask, image_ids = batch['image'], batch['text_ids'], batch['text_mask'], batch['image_id']
  image_embeds = model.image_embeds(images)
  itc, image_feat, text_feat = itc_with_momentum(model, images, image_embeds, ids, mask, alpha, image_ids)
  itm = itm_hard_negatives(model, rng, image_embeds, image_feat, text_feat, ids, mask, image_ids)
  return itc + itm, {'itc': itc, 'itm': itm}


def pretrain_loss(model, batch, rng, alpha):
  images, ids, mask = batch['image'], batch['text_ids'], batch['text_mask']
  image_embeds = model.image_embeds(images)
  itc, image_feat, text_feat = itc_with_momentum(model, images, image_embeds, ids, mask, alpha)
  # Hard negatives come from other images (by image id), as in BLIP's retrieval fine-tuning and
  # LAVIS's BLIP-2: the original pretraining excludes only the diagonal, the same rule when a
  # batch holds one caption per image (web data), but where captions of one image share a batch
  # it would teach ITM that an image's other captions do not match it.
  itm = itm_hard_negatives(model, rng, image_embeds, image_feat, text_feat, ids, mask, batch['image_id'])
  labels = jnp.where(mask == 0, -100, ids)
  lm = lm_loss(model.decoder_logits(image_embeds, ids, mask), labels,
               label_smoothing=model.config.text.label_smoothing)
  return itc + itm + lm, {'itc': itc, 'itm': itm, 'lm': lm}


def caption_loss(model, batch, rng, alpha, prompt_length: int = 0):
  lm = model.loss(model.image_embeds(batch['image']), batch['text_ids'], batch['text_mask'], prompt_length)
  return lm, {'lm': lm}


def vqa_loss(model, batch, rng, alpha):
  loss = model.loss(model.image_embeds(batch['image']), batch['question_ids'], batch['question_mask'],
                    batch['answer_ids'], batch['answer_mask'], batch['weights'])
  return loss, {'vqa': loss}


def nlvr_loss(model, batch, rng, alpha):
  logits = model(batch['image0'], batch['image1'], batch['text_ids'], batch['text_mask'])
  ce = losses.soft_cross_entropy(logits, jax.nn.one_hot(batch['label'], 2))
  accuracy = (logits.argmax(-1) == batch['label']).mean()
  return ce, {'ce': ce, 'accuracy': accuracy}


# -------------------------------------------------------------------------------------- BLIP-2


def blip2_stage1_loss(model, batch, rng, alpha):
  terms = losses.blip2_stage1_losses(model, model.image_embeds(batch['image']), batch['text_ids'],
                                         batch['text_mask'], rng=rng, image_ids=batch['image_id'])
  return terms.pop('loss'), terms


def blip2_stage2_loss(model, batch, rng, alpha):
  # The first text token ([CLS], the BOS of this tokenizer) is the LAVIS prompt_length of 1.
  lm = model.loss(model.image_embeds(batch['image']), batch['text_ids'], batch['text_mask'], prompt_length=1)
  return lm, {'lm': lm}


# ---------------------------------------------------------------------------------------- CLIP


def clip_loss(model, batch, rng, alpha):
  logits = model(batch['image'], batch['text_ids'], batch['text_mask'])
  targets = jax.nn.one_hot(jnp.arange(logits.shape[0]), logits.shape[0])
  loss = (losses.soft_cross_entropy(logits, targets) + losses.soft_cross_entropy(logits.T, targets)) / 2
  return loss, {'infonce': loss, 'logit_scale': model.logit_scale[...]}


OBJECTIVES = {o.name: o for o in [
    Objective('retrieval', 'blip', 'retrieval', 'pairs', retrieval_loss, momentum=True,
              config_fields={'with_momentum': True}),
    Objective('pretrain', 'blip', 'pretrain', 'pairs', pretrain_loss, momentum=True),
    Objective('caption', 'blip', 'caption', 'pairs', caption_loss, prompted=True),
    Objective('vqa', 'blip', 'vqa', 'vqa', vqa_loss),
    Objective('nlvr', 'blip', 'nlvr', 'nlvr', nlvr_loss),
    Objective('blip2_stage1', 'blip2', 'stage1', 'pairs', blip2_stage1_loss, frozen=(r'^visual_encoder\.',)),
    Objective('blip2_stage2', 'blip2', 'stage2', 'pairs', blip2_stage2_loss,
              frozen=(r'^visual_encoder\.', r'^opt_model\.')),
    Objective('clip', 'clip', 'contrastive', 'pairs', clip_loss),
]}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f'unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]
