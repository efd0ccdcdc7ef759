"""blip_jax training entry point.

Training (every BLIP / BLIP-2 / CLIP objective, sharded over a device mesh, orbax checkpoints)
is being built under the training issue; until it lands, this entry point checks that the
installation works: it builds a small BLIP retrieval model, compiles its ITC and ITM forward
pass and prints the scores of random images against random captions.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip_jax.models import blip


def main():
  cfg = blip.blip_config('base', image_size=64,
                         vision=dict(width=96, depth=4, num_heads=4, mlp_dim=384),
                         text=dict(hidden_size=96, num_layers=4, num_heads=4, intermediate_size=384),
                         embed_dim=32)
  model = blip.build('retrieval', cfg)
  graphdef, state = nnx.split(model)

  @jax.jit
  def scores(state, images, ids, mask):
    m = nnx.merge(graphdef, state)
    embeds = m.image_embeds(images)
    sim = m.similarity(m.image_features(embeds), m.text_features(m.text_embeds(ids, mask)))
    return sim, jax.nn.softmax(m.itm_logits(embeds, ids, mask))[:, 1]

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, 64, 64, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1000, 2000, size=(4, 12)))
  mask = jnp.ones_like(ids)
  start = time.perf_counter()
  sim, itm = jax.block_until_ready(scores(state, images, ids, mask))
  print(f'compiled and ran a {sum(x.size for x in jax.tree.leaves(state))/1e6:.1f}M-parameter BLIP '
        f'in {time.perf_counter() - start:.1f}s')
  print('ITC cosine similarity (images x texts):\n', np.round(np.asarray(sim), 3))
  print('ITM match probability:', np.round(np.asarray(itm), 3))
  print('Training is not implemented yet (see the README status section).')


if __name__ == '__main__':
  main()
