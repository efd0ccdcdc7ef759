"""Deterministic, resumable, host-sharded batches as global `jax.Array`s.

The order of examples is a pure function of (seed, epoch): epoch `e` visits
`permutation(seed, e)` in global batches of `global_batch`, and process `p` of `P` loads rows
`[p * B / P, (p + 1) * B / P)` of each. So
- every example is seen exactly once per epoch, across all processes together;
- the iterator's whole state is the global step it has reached (`state()` / `start_step`):
  a resumed run loads exactly the batches an uninterrupted run would;
- image augmentation is seeded by (seed, epoch, example), so it is reproducible too.

Images are fetched by record index from a random-access source (`builder.as_data_source`, the
TFDS ArrayRecord format) and transformed by a tf.function, a few batches ahead on threads.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Iterator

import jax
import numpy as np

from blip_jax.data.examples import Examples


class BatchLoader:
  def __init__(self, examples: Examples, source, image_fn: Callable, global_batch: int, *, seed: int = 0,
               shuffle: bool = True, drop_remainder: bool = True, sharding: jax.sharding.Sharding | None = None,
               process_index: int | None = None, process_count: int | None = None, prefetch: int = 2):
    """`source[i]` -> the dataset record i (dict of numpy); `image_fn(uint8 image, seed [2]) -> float32`.

    `drop_remainder=False` (evaluation) pads the last batch with copies of example 0 marked by
    `valid = False`.
    """
    self.examples, self.source, self.image_fn = examples, source, image_fn
    self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
    self.drop_remainder, self.sharding, self.prefetch = drop_remainder, sharding, prefetch
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch % self.process_count:
      raise ValueError(f'global batch {global_batch} is not divisible by the {self.process_count} processes')
    self.local_batch = global_batch // self.process_count
    n = len(examples)
    self.steps_per_epoch = n // global_batch if drop_remainder else -(-n // global_batch)
    if self.steps_per_epoch == 0:
      raise ValueError(f'{n} examples make no full batch of {global_batch}; lower the batch size')

  def order(self, epoch: int) -> np.ndarray:
    n = len(self.examples)
    if not self.shuffle:
      return np.arange(n)
    return np.random.default_rng([self.seed, epoch]).permutation(n)

  def indices(self, step: int) -> np.ndarray:
    """This process's example indices at global `step` (-1 = padding)."""
    epoch, k = divmod(step, self.steps_per_epoch)
    rows = self.order(epoch)[k * self.global_batch:(k + 1) * self.global_batch]
    rows = np.concatenate([rows, np.full(self.global_batch - len(rows), -1)])
    start = self.process_index * self.local_batch
    return rows[start:start + self.local_batch]

  def load(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of the batch at `step`, as numpy."""
    epoch = step // self.steps_per_epoch
    index = self.indices(step)
    valid = index >= 0
    rows = np.where(valid, index, 0)
    batch = {k: v[rows] for k, v in self.examples.columns.items()}
    records = self.examples.records[rows]
    unique = sorted(set(records.reshape(-1).tolist()))
    by_record = dict(zip(unique, self.source.__getitems__(unique)))
    for j, key in enumerate(self.examples.image_keys):
      name = 'image' if len(self.examples.image_keys) == 1 else f'image{j}'
      batch[name] = np.stack([
          self.image_fn(by_record[r][key], np.asarray([self.seed * 1_000_003 + epoch, 2 * i + j]))
          for r, i in zip(records[:, j].tolist(), rows.tolist())])
    batch['valid'] = valid
    return batch

  def to_global(self, batch: dict[str, np.ndarray]):
    if self.sharding is None:
      return batch
    return {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in batch.items()}

  def state(self, step: int) -> dict[str, int]:
    """The iterator position to checkpoint: the next global step to load."""
    return {'step': int(step)}

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
    """Global batches for steps `start_step, start_step + 1, ...` (`num_steps` of them, or forever)."""
    stop = None if num_steps is None else start_step + num_steps
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(self.prefetch, 1)) as pool:
      pending, step = [], start_step
      while True:
        while len(pending) < self.prefetch + 1 and (stop is None or step < stop):
          pending.append(pool.submit(self.load, step))
          step += 1
        if not pending:
          return
        yield self.to_global(pending.pop(0).result())

  def epoch(self) -> Iterator[dict]:
    """One pass over every example (evaluation)."""
    return self.iterate(0, self.steps_per_epoch)
