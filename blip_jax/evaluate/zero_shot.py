"""Zero-shot classification with any model that has contrastive features (CLIP, BLIP retrieval /
pretraining, BLIP-2 stage 1): class names x prompt templates -> prompt-ensembled class
embeddings (`blip_jax.zero_shot`), every image of `dataset`'s `split` classified by its
similarity with them (BLIP-2: the best query's).

Metrics: `top1`, `top5` (percent; top-5 only with more than 5 classes). Class i is the label
value `first_label + i`; `class_names` default to the label feature's names.
"""

from __future__ import annotations

import numpy as np

from blip_jax.data import datasets
from blip_jax.data import examples as examples_lib
from blip_jax.data.text import pre_caption
from blip_jax.evaluate.context import EvalContext, over_batches, over_rows
from blip_jax.zero_shot import check_templates, ensemble_prompts


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict[str, float]:
  """`top{k}` in percent: how often the true class is among the k highest of `scores` [N, C].
  Ties count against the true class (a class scored like it but ranked first by index)."""
  scores, labels = np.asarray(scores), np.asarray(labels)
  if scores.ndim != 2 or labels.shape != (scores.shape[0],):
    raise ValueError(f'scores must be [N, C] and labels [N], got {scores.shape} and {labels.shape}')
  true = scores[np.arange(len(labels)), labels]
  better = (scores > true[:, None]).sum(1) + ((scores == true[:, None]) & (np.arange(scores.shape[1])[None] < labels[:, None])).sum(1)
  return {f'top{k}': 100.0 * float(np.mean(better < k)) for k in ks}


class Evaluator:
  def __init__(self, ctx: EvalContext, *, dataset: str = '', split: str = 'validation', image_key: str = 'image',
               label_key: str = 'label', class_names: tuple[str, ...] = (), first_label: int = 0,
               templates: tuple[str, ...] = ('a picture of a {}.',), batch_size: int = 64):
    ctx.require('zero_shot', 'encode_image', 'encode_text', 'similarity')
    if not dataset:
      raise ValueError('evals.zero_shot.dataset is empty: name a TFDS dataset with a label (e.g. imagenet2012)')
    b = ctx.builder if dataset == ctx.data.name else datasets.builder({'name': dataset, 'data_dir': ctx.data.data_dir})
    names = list(class_names)
    if not names:
      label = b.info.features.get(label_key)
      if not hasattr(label, 'names'):
        raise ValueError(f'evals.zero_shot.class_names is needed: {b.name} feature {label_key!r} has no class names')
      names = [n.replace('_', ' ') for n in label.names]
    check_templates(templates, 'evals.zero_shot.templates')
    self.num_templates, self.batch_size = len(templates), batch_size
    prompts = [pre_caption(t.format(n)) for n in names for t in templates]
    self.prompt_ids, self.prompt_mask = ctx.tokenizer.encode(prompts, ctx.data.text_length)
    examples = examples_lib.classification(b, split, image_key, label_key, first_label, len(names))
    self.labels = examples.columns['label']
    self.images = ctx.loader(examples, batch_size, builder=b, split=split)
    self.image_features = ctx.jit(lambda m, x: m.encode_image(x))
    self.text_features = ctx.jit(lambda m, ids, mask: m.encode_text(ids, mask))
    self.similarity = ctx.jit(lambda m, image_feat, classes: m.similarity(image_feat, classes))

  def run(self, state) -> dict[str, float]:
    text_feat = over_rows(lambda ids, mask: self.text_features(state, ids, mask), (self.prompt_ids, self.prompt_mask),
                          self.batch_size)
    classes = np.asarray(ensemble_prompts(text_feat.reshape(-1, self.num_templates, text_feat.shape[-1])))
    image_feat = over_batches(self.images, lambda b: self.image_features(state, b['image']), 'eval zero-shot')
    scores = over_rows(lambda feat: self.similarity(state, feat, classes), (image_feat,), self.batch_size)
    ks = [k for k in (1, 5) if k == 1 or k < scores.shape[1]]  # top-5 of 5 classes or fewer says nothing
    return topk_accuracy(scores, self.labels, ks)
