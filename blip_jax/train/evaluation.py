"""Evaluation during and after training, on the eval split, per task:

| task                      | metrics (`metrics.jsonl` names)                                   |
|---------------------------|-------------------------------------------------------------------|
| retrieval, blip2_stage1   | retrieval/i2t_r1,5,10, t2i_r1,5,10, r_mean (ITC top-k + ITM rerank) |
| pretrain                  | the retrieval metrics and caption/bleu1..4, rouge_l, cider        |
| caption                   | caption/bleu1..4, rouge_l, cider, meteor with `eval.meteor` (greedy, or `eval.num_beams`) |
| clip                      | retrieval metrics (ITC only)                                      |
| vqa                       | vqa/accuracy (VQAv2 accuracy of the best-ranked training answer)  |
| nlvr                      | nlvr/accuracy                                                     |
| blip2_stage2              | val/lm (the LM loss on the eval split)                           |
| any ITC task, `eval.zero_shot.dataset` set | zero_shot/top1, top5 (prompt-ensembled class embeddings) |

Everything runs batched under jit; only the final ranking and metric arithmetic is numpy.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from blip_jax import features, generate
from blip_jax.data import examples as examples_lib
from blip_jax.data.loader import BatchLoader
from blip_jax.evaluate import captions as caption_metrics
from blip_jax.evaluate import classification
from blip_jax.evaluate import retrieval
from blip_jax.evaluate import vqa as vqa_metrics
from blip_jax.zero_shot import ensemble_prompts

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ZeroShotData:
  images: BatchLoader  # the classified images, in label order
  labels: np.ndarray  # [N] class index of each image
  prompt_ids: np.ndarray  # [C * T, L] every template of class 0, then of class 1, ...
  prompt_mask: np.ndarray
  num_templates: int


ITC_TASKS = ('retrieval', 'pretrain', 'blip2_stage1', 'clip')  # the tasks whose models have ITC features


@dataclasses.dataclass
class EvalData:
  images: BatchLoader | None = None  # every eval image once (retrieval / captions)
  index: examples_lib.RetrievalIndex | None = None
  examples: BatchLoader | None = None  # task examples (vqa / nlvr / stage 2)
  answers: tuple[np.ndarray, np.ndarray, list[str]] | None = None  # VQA candidate list (ids, mask, text)
  zero_shot: ZeroShotData | None = None


def to_host(tree):
  """Device outputs as numpy: the whole global array on every process (an eval batch is split
  over the hosts like a training batch, so no process holds all of it)."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield np.arange(start, min(start + size, n))


def _padded(index: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([index, np.full(size - len(index), index[0])])


class Evaluator:
  def __init__(self, task, trainer, data: EvalData, tokenizer, cfg, *, log=print):
    self.task, self.trainer, self.data, self.tokenizer, self.cfg = task, trainer, data, tokenizer, cfg
    self.log = log
    self.batch = cfg.get('batch_size', 64)
    self.k = cfg.get('k_test', 16)
    self._compiled = {}

  def _fn(self, name, fn):
    """A jitted `fn(model, *args)` taking the train state (the model is rebuilt inside)."""
    if name not in self._compiled:
      trainer = self.trainer
      self._compiled[name] = jax.jit(lambda state, *args: fn(trainer.model(state), *args))
    return self._compiled[name]

  def __call__(self, state) -> dict[str, float]:
    name = self.task.name
    metrics = {}
    if name in ITC_TASKS:
      metrics.update({f'retrieval/{k}': v for k, v in self.retrieval(state).items()})
    if self.data.zero_shot is not None:
      metrics.update({f'zero_shot/{k}': v for k, v in self.zero_shot(state).items()})
    if name in ('pretrain', 'caption'):
      scores, samples = self.captions(state)
      metrics.update({f'caption/{k}': v for k, v in scores.items()})
      self.samples = samples
    if name == 'vqa':
      metrics['vqa/accuracy'] = self.vqa(state)
    if name == 'nlvr':
      metrics['nlvr/accuracy'] = self.nlvr(state)
    if name == 'blip2_stage2':
      metrics['val/lm'] = self.stage2_loss(state)
    return metrics

  # ------------------------------------------------------------------------- images
  def image_outputs(self, state, fn_name, fn, images: BatchLoader | None = None):
    """`fn(model, images)` over every eval image (or those of `images`), concatenated (numpy,
    padding dropped)."""
    out = []
    run = self._fn(fn_name, fn)
    images = images or self.data.images
    for batch in tqdm.tqdm(images.epoch(), total=images.steps_per_epoch, desc=f'eval {fn_name}', leave=False):
      valid = to_host(batch['valid'])
      out.append(jax.tree.map(lambda x: x[valid], to_host(run(state, batch['image']))))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)

  # ---------------------------------------------------------------------- retrieval
  def text_features(self, state, ids, mask) -> np.ndarray:
    """Normalised ITC text features [N, E] of token ids [N, L], in batches of one shape."""
    run = self._fn('text_feat', features.text_features)
    out = []
    for rows in _chunks(len(ids), self.batch):
      padded = _padded(rows, self.batch)
      out.append(to_host(run(state, ids[padded], mask[padded]))[:len(rows)])
    return np.concatenate(out)

  def retrieval(self, state) -> dict[str, float]:
    family, index = self.task.family, self.data.index
    if family == 'clip':
      image_feat = self.image_outputs(state, 'image_feat', features.image_features)
    else:
      image_embeds, image_feat = self.image_outputs(
          state, 'image_embeds', lambda m, x: (lambda e: (e, m.image_features(e)))(m.image_embeds(x)))
    sim = features.cosine(image_feat, self.text_features(state, index.text_ids, index.text_mask))
    if family == 'clip':
      self.scores = {'i2t': sim, 't2i': sim.T}
      return retrieval.recalls(sim, index.img2txt, index.txt2img)
    itm = self._fn('itm', lambda m, embeds, ids, mask: m.itm_logits(embeds, ids, mask)[:, 1])

    def pair_scores(image_index, text_index):
      out = []
      for rows in _chunks(len(image_index), self.batch):
        p = _padded(rows, self.batch)
        t = text_index[p]
        out.append(to_host(itm(state, image_embeds[image_index[p]], index.text_ids[t], index.text_mask[t]))[:len(rows)])
      return np.concatenate(out)

    i2t, t2i = retrieval.rerank(sim, self.k, pair_scores)
    self.scores = {'i2t': i2t, 't2i': t2i}  # the final score matrices, kept for inspection
    return retrieval.recalls_from_both(i2t, t2i, index.img2txt, index.txt2img)

  # ---------------------------------------------------------------------- zero-shot
  def zero_shot(self, state) -> dict[str, float]:
    """Top-1 / top-5 accuracy of classifying by cosine with prompt-ensembled class embeddings
    (BLIP-2: the best of its query features)."""
    zs = self.data.zero_shot
    text_feat = self.text_features(state, zs.prompt_ids, zs.prompt_mask)
    classes = np.asarray(ensemble_prompts(text_feat.reshape(-1, zs.num_templates, text_feat.shape[-1])))
    scores = features.cosine(self.image_outputs(state, 'image_feat', features.image_features, zs.images), classes)
    ks = [k for k in (1, 5) if k == 1 or k < len(classes)]  # top-5 of 5 classes or fewer says nothing
    return classification.topk_accuracy(scores, zs.labels, ks)

  # ----------------------------------------------------------------------- captions
  def captions(self, state):
    tok, prompt = self.tokenizer, self.task.prompt
    prompt_ids = tok.decoder_prompt(prompt)
    max_length = self.cfg.get('caption_max_length', 30)
    min_length = self.cfg.get('caption_min_length', 5)

    num_beams = self.cfg.get('num_beams', 1)

    def caption(m, images):
      ids = jnp.broadcast_to(prompt_ids, (images.shape[0], prompt_ids.shape[1]))
      lengths = dict(max_length=max_length, min_length=min_length, eos_token_id=tok.sep_token_id,
                     pad_token_id=tok.pad_token_id)
      if num_beams > 1:
        return generate.beam_search(m.text_decoder, m.image_embeds(images), ids, num_beams=num_beams, **lengths)[0][:, 0]
      return generate.greedy(m.text_decoder, m.image_embeds(images), ids, **lengths)

    ids = self.image_outputs(state, 'caption', caption)
    texts = [tok.strip_prompt(t, prompt) for t in tok.decode(ids)]
    index = self.data.index
    refs = [[index.texts[t] for t in texts_of] for texts_of in index.img2txt]
    with_meteor = self.cfg.get('meteor', False)
    if with_meteor and not caption_metrics.meteor_available():
      log.warning('eval.meteor: METEOR skipped, it needs `java` on PATH and pycocoevalcap (or METEOR_JAR)')
      with_meteor = False
    return caption_metrics.caption_metrics(texts, refs, with_meteor=with_meteor), list(zip(texts, refs))

  # ---------------------------------------------------------------------- VQA / NLVR
  def vqa(self, state) -> float:
    a_ids, a_mask, a_text = self.data.answers

    def scores(m, images, q_ids, q_mask):
      return m.answer_scores(m.question_states(m.image_embeds(images), q_ids, q_mask), q_mask, a_ids, a_mask)

    run = self._fn('vqa', scores)
    predictions, humans = [], []
    for batch in self.data.examples.epoch():
      best = to_host(run(state, batch['image'], batch['question_ids'], batch['question_mask'])).argmax(-1)
      valid, weights, answers = to_host((batch['valid'], batch['weights'], batch['answer_ids']))
      for row in np.flatnonzero(valid):
        predictions.append(a_text[best[row]])
        humans.append(human_answers(self.tokenizer.decode(answers[row]), weights[row]))
    return vqa_metrics.mean_vqa_accuracy(predictions, humans)

  def nlvr(self, state) -> float:
    run = self._fn('nlvr', lambda m, x0, x1, ids, mask: m(x0, x1, ids, mask).argmax(-1))
    hits = total = 0
    for batch in self.data.examples.epoch():
      pred = to_host(run(state, batch['image0'], batch['image1'], batch['text_ids'], batch['text_mask']))
      valid, label = to_host((batch['valid'], batch['label']))
      hits += int(np.sum(valid & (pred == label)))
      total += int(valid.sum())
    return 100.0 * hits / total

  def stage2_loss(self, state) -> float:
    run = self._fn('stage2', lambda m, x, ids, mask: m.loss(m.image_embeds(x), ids, mask, prompt_length=1))
    losses = [float(to_host(run(state, b['image'], b['text_ids'], b['text_mask']))) for b in self.data.examples.epoch()]
    return float(np.mean(losses))


def human_answers(answers: list[str], weights, votes: int = 10) -> list[str]:
  """The annotators' answers behind unique answers and their weights (shares of `votes` human
  answers, VQAv2's 10 per question), for the VQA accuracy."""
  return [a for a, w in zip(answers, weights) for _ in range(int(round(float(w) * votes)))]


def vqa_answer_list(train_examples: examples_lib.Examples, tokenizer) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The candidate answers: every answer with weight in the training examples (sorted)."""
  ids = train_examples.columns['answer_ids']
  weights = train_examples.columns['weights']
  unique = np.unique(ids[weights > 0], axis=0)
  mask = (unique != tokenizer.pad_token_id).astype(np.int32)
  return unique, mask, tokenizer.decode(unique)

