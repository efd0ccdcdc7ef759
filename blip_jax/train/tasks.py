"""Every training objective of the originals, one `Task` each (REFERENCE.md section 5).

A task says which model it trains (family + model task), which examples it reads
(`blip_jax.data.examples` kinds), which parameters stay frozen, and how the loss of a global
batch is computed. Under `jax.jit` with the batch sharded over the mesh, "the batch" in every
loss below is the global batch: the originals' `concat_all_gather` / `negative_all_rank`.

| task           | model                   | loss                                                   |
|----------------|-------------------------|--------------------------------------------------------|
| `retrieval`    | BlipRetrieval (+ momentum, queues) | ITC (same-id positives, distillation alpha) + ITM (hard negatives) |
| `pretrain`     | BlipPretrain            | ITC + ITM + LM (tied decoder)                          |
| `caption`      | BlipCaptioner           | LM with label smoothing, prompt ignored                |
| `vqa`          | BlipVQA                 | VQA-score-weighted answer LM                           |
| `nlvr`         | BlipNLVR                | cross-entropy true/false                               |
| `blip2_stage1` | Blip2Qformer            | ITC + ITM + ITG, image encoder frozen                  |
| `blip2_stage2` | Blip2OPT                | LM on the text, image encoder and OPT frozen           |
| `clip`         | CLIP                    | symmetric InfoNCE, learnable logit scale               |
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip_jax import objectives
from blip_jax.models import blip, blip2, clip, layers, opt, qformer, vit
from blip_jax.models.bert import lm_loss


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  family: str  # 'blip' | 'blip2' | 'clip'
  model_task: str  # the model class to build (blip.TASKS key, or 'stage1'/'stage2'/'clip')
  kind: str  # examples.KINDS
  loss: Callable  # (model, batch, rng, alpha) -> (loss, {name: value})
  frozen: tuple[str, ...] = ()  # parameter path regexes that never train
  momentum: bool = False  # momentum encoders + queues (update before, enqueue inside the loss)
  prompt: str = ''  # prepended to every caption (captioning)


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
  loss = (objectives.soft_cross_entropy(sims(image_feat, text_all), targets_i2t)
          + objectives.soft_cross_entropy(sims(text_feat, image_all), targets_t2i)) / 2
  _enqueue(model, image_feat_m, text_feat_m, image_ids)
  return loss, image_feat, text_feat


def itm_hard_negatives(model, rng, image_embeds, image_feat, text_feat, text_ids, text_mask, image_ids=None):
  """ITM over positives and one hard negative per image and per text from the whole batch."""
  temp = model.temperature()
  sim_i2t = image_feat @ text_feat.T / temp
  pos = objectives.positives(image_feat.shape[0], image_ids)
  neg_image, neg_text = objectives.sample_hard_negatives(rng, sim_i2t, sim_i2t.T, pos)
  loss, _ = objectives.itm_loss_with_negatives(model.itm_logits, image_embeds, text_ids, text_mask,
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
  itm = itm_hard_negatives(model, rng, image_embeds, image_feat, text_feat, ids, mask)
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
  ce = objectives.soft_cross_entropy(logits, jax.nn.one_hot(batch['label'], 2))
  accuracy = (logits.argmax(-1) == batch['label']).mean()
  return ce, {'ce': ce, 'accuracy': accuracy}


# -------------------------------------------------------------------------------------- BLIP-2


def blip2_stage1_loss(model, batch, rng, alpha):
  terms = objectives.blip2_stage1_losses(model, model.image_embeds(batch['image']), batch['text_ids'],
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
  loss = (objectives.soft_cross_entropy(logits, targets) + objectives.soft_cross_entropy(logits.T, targets)) / 2
  return loss, {'infonce': loss, 'logit_scale': model.logit_scale[...]}


TASKS = {t.name: t for t in [
    Task('retrieval', 'blip', 'retrieval', 'pairs', retrieval_loss, momentum=True),
    Task('pretrain', 'blip', 'pretrain', 'pairs', pretrain_loss, momentum=True),
    Task('caption', 'blip', 'caption', 'pairs', caption_loss, prompt='a picture of '),
    Task('vqa', 'blip', 'vqa', 'vqa', vqa_loss),
    Task('nlvr', 'blip', 'nlvr', 'nlvr', nlvr_loss),
    Task('blip2_stage1', 'blip2', 'stage1', 'pairs', blip2_stage1_loss, frozen=(r'^visual_encoder\.',)),
    Task('blip2_stage2', 'blip2', 'stage2', 'pairs', blip2_stage2_loss,
         frozen=(r'^visual_encoder\.', r'^opt_model\.')),
    Task('clip', 'clip', 'clip', 'pairs', clip_loss),
]}


def get(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; expected one of {sorted(TASKS)}')
  return TASKS[name]


def after_update(model):
  """Clamps the originals apply to parameters after each optimiser step."""
  if isinstance(model, blip.BlipRetrieval):
    model.temp[...] = jnp.clip(model.temp[...], 0.001, 0.5)
  if isinstance(model, clip.CLIP):
    model.logit_scale[...] = jnp.clip(model.logit_scale[...], 0.0, np.log(100.0))


# ------------------------------------------------------------------------------ model configs


def model_config(task: Task, m, tokenizer):
  """The model config of `task` from the run config's `model` section and the tokenizer."""
  m = dict(m)
  vision = dict(m.get('vision', {}))
  image_size = m.get('image_size', 224)
  dtype = m.get('dtype', 'float32')
  if task.family == 'blip':
    text = {'vocab_size': tokenizer.vocab_size, 'dtype': dtype, **m.get('text', {})}
    return blip.blip_config(m.get('vit', 'base'), image_size, vision={**vision, 'dtype': dtype}, text=text,
                            embed_dim=m.get('embed_dim', 256), queue_size=m.get('queue_size', 57600),
                            momentum=m.get('momentum', 0.995), with_momentum=task.momentum,
                            bos_token_id=tokenizer.bos_token_id, enc_token_id=tokenizer.enc_token_id,
                            sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                            prompt=task.prompt)
  if task.family == 'blip2':
    vision_cfg = vit.vit_config(m.get('vit', 'eva_g'), image_size=image_size, **vision, dtype=dtype)
    q = qformer.QFormerConfig(**{'encoder_width': vision_cfg.width, 'vocab_size': tokenizer.vocab_size,
                                 'dtype': dtype, **m.get('qformer', {}),
                                 'text_input': task.model_task == 'stage1'})
    llm = None
    if task.model_task == 'stage2':
      llm = opt.opt_config(m.get('opt', '125m'), **{
          'vocab_size': tokenizer.vocab_size, 'pad_token_id': tokenizer.pad_token_id,
          'bos_token_id': tokenizer.cls_token_id, 'eos_token_id': tokenizer.sep_token_id, 'dtype': dtype,
          **m.get('opt_overrides', {})})
    return blip2.Blip2Config(vision=vision_cfg, qformer=q, embed_dim=m.get('embed_dim', 256),
                             bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, opt=llm)
  text = {'vocab_size': tokenizer.vocab_size, 'eos_token_id': tokenizer.sep_token_id, 'dtype': dtype,
          **m.get('text', {})}
  return clip.clip_config(m.get('variant', 'ViT-B/16'), vision={'image_size': image_size, **vision, 'dtype': dtype},
                          text=text, **({'embed_dim': m['embed_dim']} if 'embed_dim' in m else {}))


def build_model(task: Task, config, seed: int = 0) -> nnx.Module:
  if task.family == 'blip':
    return blip.build(task.model_task, config, seed=seed)
  if task.family == 'blip2':
    return blip2.build(config, seed=seed)
  return clip.build(config, seed=seed)
