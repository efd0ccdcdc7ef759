"""`Rngs` for building models: flax's `nnx.Rngs` with streams that advance their counter without a
quadratic cost under tracing.

flax's `RngStream.__call__` advances with `count[...] += 1`; `Variable.set_value(index=...)` then
compares the new value's `.sharding` with the old one's. On a tracer (every model built under
`nnx.eval_shape` or `jit`: converting, loading, `init_from`, the sharded train state) JAX answers
that with an AttributeError whose message walks the whole program traced so far, so a build
costs time quadratic in the number of weights: BLIP-base pretraining built abstractly in 35 s
instead of 5 s (flax 0.12.8, jax 0.10.2; both main branches still do it, 2026-12). Setting the
whole value skips the comparison. The keys and counts are flax's.
"""

from __future__ import annotations

import jax
from flax import nnx


class RngStream(nnx.RngStream):
  def __call__(self) -> jax.Array:
    self.count._check_can_update()  # as flax: no update from another trace level
    count = self.count.get_value()
    self.count.set_value(count + 1)
    return jax.random.fold_in(self.key.get_value(), count)


class Rngs(nnx.Rngs):
  """`nnx.Rngs(seed)` (one `default` stream) with the stream above."""

  def __init__(self, seed: int):
    super().__init__(seed)
    self.default = RngStream(self.default.key.get_value(), tag='default')
