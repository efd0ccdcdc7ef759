"""Multi-host helpers: joining the other processes, doing something once, and moving arrays
between the global view and this host.

Every process runs the same program (`train.py`, CapFilt, evaluation); process 0 alone
prepares shared files (datasets, logs, outputs) while the others wait at a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np

T = TypeVar('T')


def initialize(multihost: bool = False) -> None:
  """`jax.distributed.initialize()` when asked (`--multihost`: TPU pods and SLURM, where JAX
  finds the cluster itself) or when the environment names a coordinator
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""
  if not (multihost or os.environ.get('JAX_COORDINATOR_ADDRESS')):
    return
  env = {}
  if 'JAX_COORDINATOR_ADDRESS' in os.environ:
    env['coordinator_address'] = os.environ['JAX_COORDINATOR_ADDRESS']
  if 'JAX_NUM_PROCESSES' in os.environ:
    env.update(num_processes=int(os.environ['JAX_NUM_PROCESSES']), process_id=int(os.environ['JAX_PROCESS_ID']))
  jax.distributed.initialize(**env)


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Wait until every process gets here (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def primary_first(name: str, fn: Callable[[], T]) -> T:
  """`fn()` on process 0, then on the others once it is done (process 0 writes what they read)."""
  if jax.process_count() == 1:
    return fn()
  result = fn() if is_primary() else None
  barrier(name)
  return result if is_primary() else fn()


def to_host(tree):
  """Device outputs as numpy: the whole global array on every process (an eval batch is split
  over the hosts like a training batch, so no process holds all of it)."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(fetch, tree)


def local_rows(x, mesh) -> np.ndarray:
  """This process's rows of a batch-sharded global array, as numpy."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec as P
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, P(('data', 'fsdp'))))


def replicate(tree, sharding):
  """Every leaf on every device of `sharding`'s mesh, from each process's own copy (a plain
  device_put would be a cross-host transfer from the device the weights were loaded on)."""
  def put(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # RNG streams: via their raw data
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(put, tree)
