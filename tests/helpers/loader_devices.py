"""BatchLoader on many devices: run by test_loader.py in a subprocess with simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python loader_devices.py
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python loader_devices.py --process_id I --num_processes 2 --port P

Every global batch must be a `jax.Array` sharded on the mesh's batch axes whose device shards hold
exactly the rows of the 1-process, unsharded batch at the same positions, for the project's meshes
and for a mesh whose devices are listed in reverse (so process 0's devices hold the second half
of each batch), in training (shuffled) and evaluation (padded) mode. Exits non-zero on a mismatch.
"""

import argparse

import jax
import numpy as np
import process_group


class Source:
  """Record i holds a 2 x 2 image filled with i."""

  def __getitems__(self, rows):
    return [{'image': np.full((2, 2, 3), r, np.uint8)} for r in rows]


def main():
  parser = argparse.ArgumentParser()
  process_group.add_flags(parser)
  args = parser.parse_args()
  process_group.join(args)
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh

  from blip_jax.data.examples import Examples
  from blip_jax.data.loader import BatchLoader
  from blip_jax.train import state as state_lib

  assert jax.device_count() == 8, jax.devices()
  n, batch = 38, 16
  table = Examples(np.arange(n)[:, None], ('image',), {'id': np.arange(n), 'pair': np.stack([np.arange(n)] * 3, 1)})
  image_fn = lambda im, seed: im[..., 0].astype(np.float32)  # noqa: E731
  meshes = {'8x1': state_lib.make_mesh(8, 1), '4x2': state_lib.make_mesh(4, 2),
            'reversed': Mesh(np.asarray(jax.devices()[::-1]).reshape(8, 1), ('data', 'fsdp'))}
  for mesh_name, mesh in meshes.items():
    sharding = state_lib.batch_sharding(mesh)
    for mode in ({'seed': 5}, {'shuffle': False, 'drop_remainder': False}):
      loader = BatchLoader(table, Source(), image_fn, batch, sharding=sharding, **mode)
      reference = BatchLoader(table, Source(), image_fn, batch, process_index=0, process_count=1, **mode)
      mine = {d.id for d in jax.local_devices()}
      assert loader.local_batch == batch // jax.process_count()
      seen = []
      for step, got in enumerate(loader.iterate(0, loader.steps_per_epoch)):
        want = reference.load(step)
        for key in ('id', 'pair', 'image', 'valid'):
          x = got[key]
          assert isinstance(x, jax.Array) and x.shape == want[key].shape and x.sharding == sharding, (key, x.shape)
          assert {s.device.id for s in x.addressable_shards} == mine
          for shard in x.addressable_shards:  # 2 rows per device, at the device's place in the mesh
            assert shard.data.shape[0] == batch // 8
            np.testing.assert_array_equal(np.asarray(shard.data), want[key][shard.index],
                                          err_msg=str((mesh_name, key, step)))
        seen.append(multihost_utils.process_allgather(got['id'], tiled=True)[multihost_utils.process_allgather(
            got['valid'], tiled=True)])
      seen = np.concatenate(seen)
      expected = n // batch * batch if mode.get('drop_remainder', True) else n
      assert len(seen) == len(set(seen.tolist())) == expected, (mesh_name, mode, len(seen))
      if mesh_name == 'reversed' and jax.process_count() == 2:  # process 0 holds the second half
        assert loader.local_rows[0] == (8 if jax.process_index() == 0 else 0), loader.local_rows
  print('ok', jax.process_index(), jax.process_count(), flush=True)


if __name__ == '__main__':
  main()
