"""Retrieval evaluation: recalls on a crafted matrix, and the batched ITC + ITM-rerank evaluation
equal to a per-query loop over a small random BLIP (the originals' `evaluation` procedure)."""

import numpy as np
import optax
from flax import nnx

from blip_jax import registry
from blip_jax.data import examples as ex
from blip_jax.data.loader import BatchLoader
from blip_jax.evaluate import EvalContext, retrieval
from blip_jax.testing import tiny
from blip_jax.train import state as state_lib


def test_recalls_on_a_crafted_matrix():
  # 3 images, 2 texts each (texts 0-1 -> image 0, 2-3 -> image 1, 4-5 -> image 2).
  sim = np.array([[0.1, 0.9, 0.8, 0.0, 0.0, 0.0],    # image 0: its text 1 ranks 1st
                  [0.9, 0.8, 0.1, 0.2, 0.7, 0.0],    # image 1: its text 3 ranks 4th (rank 3)
                  [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])   # image 2: its text 4 ranks 5th (rank 4)
  img2txt = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
  txt2img = np.array([0, 0, 1, 1, 2, 2])
  r = retrieval.recalls(sim, img2txt, txt2img, ks=(1, 4))
  np.testing.assert_allclose([r['i2t_r1'], r['i2t_r4']], [100 / 3, 200 / 3])
  # Text queries, rank of their image in their column: t0 [.1 .9 .5] -> 2, t1 -> 0, t2 [.8 .1 .3] -> 2,
  # t3 [0 .2 .2] -> 0 (ties keep the first), t4 [0 .7 .1] -> 1, t5 [0 0 0] -> 2.
  np.testing.assert_allclose([r['t2i_r1'], r['t2i_r4']], [100 * 2 / 6, 100.0])
  np.testing.assert_allclose(r['r_mean'], np.mean([100 / 3, 200 / 3, 100 * 2 / 6, 100.0]))


class ImageSource:
  def __init__(self, images):
    self.images = images

  def __getitems__(self, rows):
    return [{'image': self.images[r]} for r in rows]


class InMemory(EvalContext):
  """An eval context over an index and images held in memory."""

  def __init__(self, index, images, **kw):
    super().__init__(None, None, tiny.TOKENIZER, 32, 'blip_eval', None, **kw)
    self._index, self.images = index, images

  def image_loader(self, batch_size):
    return BatchLoader(ex.Examples(np.arange(len(self.images))[:, None], ('image',), {}), ImageSource(self.images),
                       lambda im, seed: im, batch_size, shuffle=False, drop_remainder=False)


def test_batched_rerank_equals_a_per_query_loop():
  objective, config, _ = tiny.build('retrieval')
  build = lambda: registry.build('blip', objective.task, config, seed=3)
  trainer = state_lib.Trainer(objective, build, optax.sgd(0.0), state_lib.make_mesh())
  state = trainer.init()
  model = trainer.model(state)
  rng = np.random.default_rng(0)
  n_images, per_image, length, k = 6, 2, 9, 4
  images = rng.normal(size=(n_images, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(4, 60, (n_images * per_image, length)).astype(np.int32)
  ids[:, 0] = tiny.TOKENIZER.cls_token_id
  mask = (np.arange(length)[None] < rng.integers(3, length + 1, (len(ids), 1))).astype(np.int32)
  txt2img = np.repeat(np.arange(n_images), per_image)
  img2txt = [np.flatnonzero(txt2img == i) for i in range(n_images)]
  index = ex.RetrievalIndex(np.arange(n_images), ids, mask, [''] * len(ids), txt2img, img2txt, [''] * len(ids))
  ctx = InMemory(index, images, model_of=trainer.model, abstract_model=nnx.eval_shape(build))
  evaluator = retrieval.Evaluator(ctx, batch_size=4, k_test=k)
  got = evaluator.run(state)

  # The reference: one query at a time, as the originals' evaluation() loops.
  embeds = np.asarray(model.image_embeds(images))
  image_feat = np.asarray(model.image_features(embeds))
  text_feat = np.asarray(model.text_features(model.text_embeds(ids, mask)))
  sim = image_feat @ text_feat.T
  itm = lambda i, t: float(model.itm_logits(embeds[i:i + 1], ids[t:t + 1], mask[t:t + 1])[0, 1])
  i2t = np.full(sim.shape, -100.0)
  for i in range(n_images):
    for t in np.argsort(-sim[i])[:k]:
      i2t[i, t] = itm(i, t) + sim[i, t]
  t2i = np.full(sim.T.shape, -100.0)
  for t in range(len(ids)):
    for i in np.argsort(-sim[:, t])[:k]:
      t2i[t, i] = itm(i, t) + sim[i, t]
  # Candidates outside the top k all score -100: their ties go by index (a stable sort).
  order = lambda row: np.argsort(-row, kind='stable')
  i2t_rank = [min(np.flatnonzero(order(i2t[i]) == t)[0] for t in img2txt[i]) for i in range(n_images)]
  t2i_rank = [np.flatnonzero(order(t2i[t]) == txt2img[t])[0] for t in range(len(ids))]
  for kk in (1, 5, 10):
    np.testing.assert_allclose(got[f'i2t_r{kk}'], 100 * np.mean(np.array(i2t_rank) < kk))
    np.testing.assert_allclose(got[f't2i_r{kk}'], 100 * np.mean(np.array(t2i_rank) < kk))
  # And the score matrices themselves.
  np.testing.assert_allclose(evaluator.scores['i2t'], i2t, atol=1e-5)
  np.testing.assert_allclose(evaluator.scores['t2i'], t2i, atol=1e-5)
