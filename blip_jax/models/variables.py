"""Walking a model's weights by attribute path, and building a model without initialising it.

The attribute paths mirror the PyTorch module names (`visual_encoder.blocks.3.attn.qkv.kernel`),
so these are what the converters, the converted-model directories and `init_from` all key on.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def is_weight(v) -> bool:
  return isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState)


def named_variables(module: nnx.Module) -> list[tuple[str, nnx.Variable]]:
  """Every (dotted path, Variable) of `module`, shared Variables once per path they have."""
  out = []

  def walk(node, prefix):
    for name, value in vars(node).items():
      if name.startswith('_'):
        continue
      path = f'{prefix}{name}'
      if is_weight(value):
        out.append((path, value))
      elif isinstance(value, nnx.Module):
        walk(value, path + '.')

  walk(module, '')
  return out


def unique_weights(model: nnx.Module) -> dict[str, nnx.Variable]:
  """{dotted path: Variable} of the model's weights, a shared Variable under its first path in
  sorted order (the order of a split / merged or abstract model too, so the names of tied
  weights do not depend on how the model was made)."""
  out, seen = {}, set()
  for path, var in sorted(named_variables(model), key=lambda item: item[0]):
    if id(var) not in seen:
      seen.add(id(var))
      out[path] = var
  return out


def nonfinite_error(model: nnx.Module, source: str) -> str | None:
  """The message naming `source` and the model's weights that hold NaN or Inf (a damaged
  checkpoint, or one saved from a diverged run), or None when every weight is finite."""
  floating = {path: var for path, var in unique_weights(model).items() if jnp.issubdtype(var.dtype, jnp.floating)}
  finite = jax.device_get({path: jnp.isfinite(var.get_value()).all() for path, var in floating.items()})  # one fetch
  bad = [path for path, ok in finite.items() if not ok]
  if not bad:
    return None
  more = f' and {len(bad) - 3} more' if len(bad) > 3 else ''
  return (f'{source}: weights hold NaN or Inf: {", ".join(bad[:3])}{more}; the checkpoint is damaged or was '
          'saved from a run that diverged')


def build_abstract(make: Callable[[], nnx.Module]) -> nnx.Module:
  """`make()`'s model with shape-only weights (no memory) but real RNG state (dropout keys)."""
  model = nnx.eval_shape(make)
  # Under jit only the requested outputs are computed: the weight initialisers are dead code.
  nnx.update(model, jax.jit(lambda: nnx.state(make(), nnx.RngState))())
  return model


def materialise_initial_values(model: nnx.Module, make: Callable[[], nnx.Module]) -> list[str]:
  """Give every still shape-only weight of `model` its initial value from `make()`, computing
  only those; returns their paths."""
  pending = {path: var for path, var in named_variables(model)
             if isinstance(var.get_value(), jax.ShapeDtypeStruct)}
  if pending:
    values = jax.jit(lambda: {p: v.get_value() for p, v in named_variables(make()) if p in pending})()
    for path, var in pending.items():
      var.set_value(values[path])
  return sorted(pending)
