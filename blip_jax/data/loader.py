"""Deterministic, resumable, host-sharded batches as global `jax.Array`s.

The order of examples is a pure function of (seed, epoch): epoch `e` visits
`permutation(seed, e)` of the N examples in global batches of B, and each process loads only the
rows of each global batch that its own devices hold (with a `sharding`: the rows its addressable
devices' shards cover, whatever the mesh's device order; without one: process `p` of `P` loads
rows `[p * B / P, (p + 1) * B / P)`). So, across all processes together:
- training (`drop_remainder=True`) runs floor(N / B) steps per epoch and sees floor(N / B) * B
  distinct examples in each epoch: every example exactly once when B divides N; otherwise the
  N mod B examples left over are the last of that epoch's permutation, a different random few
  each epoch, so no example is left out for good;
- evaluation (`drop_remainder=False`, no shuffle) sees every example exactly once, in order; the
  last batch is padded to B with copies of example 0 marked `valid = False`;
- the iterator's whole state is the global step it has reached (`state()` / `start_step`):
  a resumed run loads exactly the batches an uninterrupted run would;
- image augmentation is seeded by (seed, epoch, example), so it is reproducible too.

Images are fetched by record index from a random-access source (`builder.as_data_source`, the
TFDS ArrayRecord format) and transformed by a tf.function, a few batches ahead on threads.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator

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
    self.local_rows = self._local_rows()  # positions in each global batch that this process loads
    self.local_batch = len(self.local_rows)
    n = len(examples)
    self.steps_per_epoch = n // global_batch if drop_remainder else -(-n // global_batch)
    if self.steps_per_epoch == 0:
      raise ValueError(f'{n} examples make no full batch of {global_batch}; lower the batch size')

  def _local_rows(self) -> np.ndarray:
    b = self.global_batch
    if self.sharding is None:
      if b % self.process_count:
        raise ValueError(f'global batch {b} is not divisible by the {self.process_count} processes')
      return np.arange(self.process_index * b // self.process_count, (self.process_index + 1) * b // self.process_count)
    try:
      slices = self.sharding.addressable_devices_indices_map((b,)).values()
    except ValueError as e:
      raise ValueError(f'global batch {b} does not split evenly over the batch sharding {self.sharding}: {e}') from None
    rows = sorted({range(b)[s[0]] for s in slices}, key=lambda r: r.start)  # one range per distinct shard
    return np.concatenate([np.arange(r.start, r.stop) for r in rows])

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
    return rows[self.local_rows]

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
    return {k: jax.make_array_from_process_local_data(self.sharding, v, (self.global_batch, *v.shape[1:]))
            for k, v in batch.items()}

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
