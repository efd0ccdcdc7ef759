"""Image-text retrieval evaluation as the originals do it (REFERENCE.md section 7).

1. the ITC cosine matrix of every image against every text;
2. optionally, for each query, its top `k` candidates rescored by the ITM head: the final score
   is `itm_logit[:, 1] + cosine`, every other entry -100;
3. Recall@1/5/10 in both directions with several texts per image: an image query hits when any
   of its texts ranks within k; a text query when its image does.
"""

from __future__ import annotations

import numpy as np


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
