"""The sharded train state and the jitted train step.

The state is a dict of arrays (a pytree): `params` (what the optimiser trains), `rest` (every
other model variable: frozen parameters, momentum encoders, queues, dropout RNG streams),
`opt_state`, `step` and `rng`. It is built directly in its sharding with `jax.eval_shape` +
`jax.jit(init, out_shardings=...)`, and the step is jitted with explicit shardings and donation.

Sharding: the batch is split over the mesh axes ('data', 'fsdp'); a state leaf (a parameter,
its optimiser moments, a frozen weight, a queue) of at least `fsdp_min_size` elements
(`config.mesh.fsdp_min_size`) is split over 'fsdp' along its largest dimension divisible by the
axis size when the mesh has one, and replicated otherwise.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from blip_jax.train.objectives import Objective
from blip_jax.train.optim import path_name

MOMENTUM = r'^[a-z_]+_m\.'  # visual_encoder_m., text_proj_m., ...: updated by EMA, not by gradients
FSDP_MIN_SIZE = 1 << 14  # smaller leaves are replicated: splitting them saves less than it costs


def make_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  """A ('data', 'fsdp') mesh over all devices; -1 takes what the other axis leaves."""
  n = jax.device_count()
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} does not cover the {n} devices')
  # Auto axes: shardings are given at the jit boundary and XLA inserts the collectives (the
  # contrastive losses read the global batch without any explicit gather).
  return jax.make_mesh((data, fsdp), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


def leaf_sharding(mesh: Mesh, x, min_size: int = FSDP_MIN_SIZE) -> NamedSharding:
  n = mesh.shape['fsdp']
  shape = getattr(x, 'shape', ())
  if n > 1 and np.prod(shape, dtype=np.int64) >= min_size:
    dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0]
    if dims:
      spec = [None] * len(shape)
      spec[dims[0]] = 'fsdp'
      return NamedSharding(mesh, P(*spec))
  return NamedSharding(mesh, P())


def trainable_filter(frozen: tuple[str, ...]):
  """nnx filter: Params whose path matches none of `frozen` (nor the momentum copies)."""
  patterns = [re.compile(p) for p in (*frozen, MOMENTUM)]

  def keep(path, value):
    name = path_name(path)
    return isinstance(value, nnx.Param) and not any(p.search(name) for p in patterns)
  return keep


class Trainer:
  """Builds the sharded state of an objective's model and runs its jitted step."""

  def __init__(self, objective: Objective, build_model, tx: optax.GradientTransformation, mesh: Mesh, *,
               frozen: tuple[str, ...] = (), alpha_fn=lambda step: 0.0, loss_kwargs=None, seed: int = 0,
               fsdp_min_size: int = FSDP_MIN_SIZE):
    self.objective, self.build_model, self.tx, self.mesh = objective, build_model, tx, mesh
    self.alpha_fn, self.seed = alpha_fn, seed
    self.loss_kwargs = loss_kwargs or {}
    self.trainable = trainable_filter((*objective.frozen, *frozen))
    abstract = nnx.eval_shape(build_model)
    self.graphdef, _, rest = nnx.split(abstract, self.trainable, ...)
    self.is_key = jax.tree.map(lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key), rest)
    self.state_shapes = jax.eval_shape(self._init)
    self.state_sharding = jax.tree.map(lambda x: leaf_sharding(mesh, x, fsdp_min_size), self.state_shapes)
    replicated = NamedSharding(mesh, P())
    self.step_fn = jax.jit(self._step, in_shardings=(self.state_sharding, batch_sharding(mesh), replicated),
                           out_shardings=(self.state_sharding, replicated), donate_argnums=0)

  # ------------------------------------------------------------------------------ state
  # Typed PRNG keys (the models' dropout streams) are kept as raw key data, so that every
  # leaf of the state can be saved, compared and selected like any array.
  def _split(self, model):
    _, params, rest = nnx.split(model, self.trainable, ...)
    return params, jax.tree.map(lambda x, k: jax.random.key_data(x) if k else x, rest, self.is_key)

  def _merge(self, params, rest):
    return nnx.merge(self.graphdef, params,
                     jax.tree.map(lambda x, k: jax.random.wrap_key_data(x) if k else x, rest, self.is_key))

  def _init(self):
    params, rest = self._split(self.build_model())
    return {'params': params, 'rest': rest, 'opt_state': self.tx.init(params),
            'step': jnp.zeros((), jnp.int32), 'rng': jax.random.PRNGKey(self.seed)}

  def init(self):
    """The initial state, created on the devices in its sharding."""
    return jax.jit(self._init, out_shardings=self.state_sharding)()

  def model(self, state) -> nnx.Module:
    """The model held by `state` (for evaluation and saving)."""
    return self._merge(state['params'], state['rest'])

  def with_model(self, state, model):
    """`state` with the model's variables replaced (e.g. after loading weights), resharded."""
    params, rest = self._split(model)
    # Under jit, so loaded host values and the global arrays of a multi-host state mix.
    replace = lambda state, params, rest: {**state, 'params': params, 'rest': rest, 'opt_state': self.tx.init(params)}
    return jax.jit(replace, out_shardings=self.state_sharding)(state, params, rest)

  # ------------------------------------------------------------------------------- step
  def _step(self, state, batch, index):
    rng = jax.random.fold_in(state['rng'], state['step'])
    alpha = self.alpha_fn(state['step'])
    rest = state['rest']
    if self.objective.momentum:  # p_m <- m p_m + (1 - m) p, before the momentum features (the originals' order)
      model = self._merge(state['params'], rest)
      model.update_momentum()
      _, rest = self._split(model)

    def loss_fn(params):
      # Training mode: dropout and drop path on, as the originals' model.train(). Only the
      # state leaves the step, so the graphdef (and every model evaluated from it) stays in
      # inference mode.
      model = nnx.view(self._merge(params, rest), deterministic=False, raise_if_not_found=False)
      loss, terms = self.objective.loss(model, batch, rng, alpha, **self.loss_kwargs)
      return loss, (terms, self._split(model)[1])

    (loss, (terms, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    new_rest = jax.lax.stop_gradient(new_rest)
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
    model = self._merge(optax.apply_updates(state['params'], updates), new_rest)
    if hasattr(model, 'after_update'):  # the originals' clamps (BLIP's temp, CLIP's logit scale)
      model.after_update()
    params, new_rest = self._split(model)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves the state as it was (its step count too), and so does every step
    # after it, whose `index` the state then no longer has: the loop, which reads the metrics only
    # at its log steps, stops with the state from before the divergence and nothing poisoned kept.
    applied = finite & ((index < 0) | (state['step'] == index))
    new = {'params': params, 'rest': new_rest, 'opt_state': opt_state, 'step': state['step'] + 1,
           'rng': state['rng']}
    new = jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, state)
    metrics = {'loss': loss, **terms, 'grad_norm': grad_norm, 'alpha': jnp.asarray(alpha, jnp.float32),
               'finite': finite, 'applied': applied}
    return new, metrics

  def step(self, state, batch, index: int = -1):
    """One step; `index` (the loop's step number, -1: unchecked) must be the state's own step
    count for the step to apply (see `_step`). Metrics stay on the device until fetched."""
    return self.step_fn(state, batch, np.int32(index))
