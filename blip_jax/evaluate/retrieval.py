"""Image-text retrieval evaluation as the originals do it (REFERENCE.md section 7).

1. the ITC similarity of every image against every text (`model.similarity`: cosine; BLIP-2 the
   best query's);
2. with `k_test > 0`, for each query, its top `k_test` candidates rescored by the ITM head: the
   final score is `itm_logit[:, 1] + similarity`, every other entry -100;
3. Recall@1/5/10 in both directions with several texts per image: an image query hits when any
   of its texts ranks within k; a text query when its image does.

Metrics: `i2t_r1`, `i2t_r5`, `i2t_r10`, `t2i_r1`, ..., `r_mean` (percent).
"""

from __future__ import annotations

import numpy as np

from blip_jax.evaluate.context import EvalContext, over_batches, over_rows


def recalls(scores_i2t: np.ndarray, img2txt, txt2img: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
  """Recall@k in percent: `i2t_r{k}` (text retrieval), `t2i_r{k}` (image retrieval), `r_mean`."""
  scores_i2t = np.asarray(scores_i2t)
  order = np.argsort(-scores_i2t, axis=1, kind='stable')
  position = np.empty_like(order)
  np.put_along_axis(position, order, np.arange(order.shape[1])[None], axis=1)
  i2t_rank = np.array([position[i, texts].min() for i, texts in enumerate(img2txt)])
  order_t = np.argsort(-scores_i2t.T, axis=1, kind='stable')
  t2i_rank = np.argmax(order_t == np.asarray(txt2img)[:, None], axis=1)
  out = {}
  for k in ks:
    out[f'i2t_r{k}'] = 100.0 * float(np.mean(i2t_rank < k))
  for k in ks:
    out[f't2i_r{k}'] = 100.0 * float(np.mean(t2i_rank < k))
  out['r_mean'] = float(np.mean(list(out.values())))
  return out


def rerank(sim: np.ndarray, k: int, pair_scores) -> tuple[np.ndarray, np.ndarray]:
  """ITM reranking of the top `k` of every row of `sim` [I, T] and of every column.

  `pair_scores(image_index [N], text_index [N]) -> itm logit of 'match' [N]` is called once per
  direction on all the candidate pairs (it batches them). Returns the final (i2t [I, T],
  t2i [T, I]) score matrices.
  """
  k = min(k, sim.shape[0], sim.shape[1])
  out = []
  for s in (sim, sim.T):
    top = np.argsort(-s, axis=1, kind='stable')[:, :k]
    rows = np.repeat(np.arange(s.shape[0]), k)
    cols = top.reshape(-1)
    pairs = (rows, cols) if s is sim else (cols, rows)
    score = np.full(s.shape, -100.0, np.float32)
    score[rows, cols] = np.asarray(pair_scores(*pairs)) + s[rows, cols]
    out.append(score)
  return out[0], out[1]


def recalls_from_both(scores_i2t, scores_t2i, img2txt, txt2img, ks=(1, 5, 10)) -> dict[str, float]:
  """Recalls when the two directions have their own score matrices (after reranking)."""
  i2t = {k: v for k, v in recalls(scores_i2t, img2txt, txt2img, ks).items() if k.startswith('i2t')}
  t2i = {k: v for k, v in recalls(scores_t2i.T, img2txt, txt2img, ks).items() if k.startswith('t2i')}
  out = {**i2t, **t2i}
  out['r_mean'] = float(np.mean(list(out.values())))
  return out


class Evaluator:
  """Retrieval over the eval split (every image once with all its captions)."""

  def __init__(self, ctx: EvalContext, *, k_test: int = 16, batch_size: int = 64):
    ctx.require('retrieval', 'encode_image', 'encode_text', 'similarity',
                *(('image_embeds', 'image_features', 'itm_logits') if k_test else ()))
    self.ctx, self.k_test, self.batch_size = ctx, k_test, batch_size
    self.index = ctx.retrieval_index()
    self.images = ctx.image_loader(batch_size)
    self.text_features = ctx.jit(lambda m, ids, mask: m.encode_text(ids, mask))
    self.similarity = ctx.jit(lambda m, image_feat, text_feat: m.similarity(image_feat, text_feat))
    if k_test:
      self.image_outputs = ctx.jit(lambda m, x: (lambda e: (e, m.image_features(e)))(m.image_embeds(x)))
      self.itm = ctx.jit(lambda m, embeds, ids, mask: m.itm_logits(embeds, ids, mask)[:, 1])
    else:
      self.image_outputs = ctx.jit(lambda m, x: m.encode_image(x))
    self.scores = None  # the final (i2t, t2i) score matrices of the last run, for inspection

  def run(self, state) -> dict[str, float]:
    index = self.index
    outputs = over_batches(self.images, lambda b: self.image_outputs(state, b['image']), 'eval retrieval images')
    image_embeds, image_feat = outputs if self.k_test else (None, outputs)
    text_feat = over_rows(lambda ids, mask: self.text_features(state, ids, mask),
                          (index.text_ids, index.text_mask), self.batch_size)
    sim = over_rows(lambda feat: self.similarity(state, feat, text_feat), (image_feat,), self.batch_size)
    if not self.k_test:
      self.scores = {'i2t': sim, 't2i': sim.T}
      return recalls(sim, index.img2txt, index.txt2img)

    def pair_scores(image_index, text_index):
      return over_rows(lambda i, t: self.itm(state, image_embeds[i], index.text_ids[t], index.text_mask[t]),
                       (image_index, text_index), self.batch_size)

    i2t, t2i = rerank(sim, self.k_test, pair_scores)
    self.scores = {'i2t': i2t, 't2i': t2i}
    return recalls_from_both(i2t, t2i, index.img2txt, index.txt2img)
