"""Generic PyTorch -> Flax NNX weight assignment.

Our modules mirror the PyTorch module names, so a parameter's checkpoint key is its attribute
path joined with '.', with the leaf renamed (kernel/scale/embedding -> weight). Family files
(`convert/blip.py`, ...) only normalise other layouts to that naming and say which leftover
keys are expected.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip_jax.models.variables import named_variables
from blip_jax.models.vit import resize_pos_embed

LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}


class ConversionError(ValueError):
  """A checkpoint that does not fit the model: names the key and what was expected."""


@dataclasses.dataclass
class Report:
  """What a conversion did, key by key."""
  source: str
  layout: str
  task: str
  converted: list[str] = dataclasses.field(default_factory=list)
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # checkpoint key -> why
  missing: dict[str, str] = dataclasses.field(default_factory=dict)  # model key -> why
  resized: dict[str, str] = dataclasses.field(default_factory=dict)  # model key -> how

  def summary(self) -> str:
    lines = [f'source: {self.source}', f'layout: {self.layout}, task: {self.task}',
             f'converted: {len(self.converted)} tensors']
    for title, entries in (('resized', self.resized), ('skipped', self.skipped),
                           ('missing (expected)', self.missing)):
      if entries:
        lines.append(f'{title}: {len(entries)}')
        lines.extend(f'  {k}: {why}' for k, why in sorted(entries.items()))
    return '\n'.join(lines)


def torch_name(path: str) -> str:
  head, _, leaf = path.rpartition('.')
  leaf = LEAF_TO_TORCH.get(leaf, leaf)
  return f'{head}.{leaf}' if head else leaf


def to_flax_layout(path: str, array: np.ndarray) -> np.ndarray:
  """torch Linear [out, in] -> kernel [in, out]; Conv2d [O, I, kh, kw] -> [kh, kw, I, O]."""
  if path.endswith('.kernel'):
    if array.ndim == 2:
      return array.T
    if array.ndim == 4:
      return array.transpose(2, 3, 1, 0)
  return array


@dataclasses.dataclass
class Rules:
  """Family-specific knowledge used by `assign`."""
  # Regex substitutions turning a model path into its checkpoint key (after the leaf rename).
  path_renames: tuple[tuple[str, str], ...] = ()
  # Checkpoint keys that may stay unused: (regex, why).
  expected_unused: tuple[tuple[str, str], ...] = ()
  # Model keys that may be absent (they keep their initial value): (regex, why).
  expected_missing: tuple[tuple[str, str], ...] = ()
  # Reshape hooks: model path regex -> fn(array, target_shape) -> (array, description).
  resize: tuple[tuple[str, Callable], ...] = ()


def renamer(renames):
  """A function applying (regex, replacement) pairs to a key, in order."""
  def rename(key: str) -> str:
    for pattern, repl in renames:
      key = re.sub(pattern, repl, key)
    return key
  return rename


def merge_overrides(overrides: dict, vision: dict, **towers: dict) -> dict:
  """Apply user overrides to inferred config dicts in place: `vision={...}` and `image_size=`
  to `vision`, `text={...}` (or `qformer=` ...) to the named tower. Returns the rest."""
  rest = dict(overrides)
  vision.update(rest.pop('vision', None) or {})
  if 'image_size' in rest:
    vision['image_size'] = rest.pop('image_size')
  for name, tower in towers.items():
    tower.update(rest.pop(name, None) or {})
  return rest


def count_indexed(keys, pattern: str) -> int:
  """Number of layers: 1 + the largest index captured by `pattern` among `keys` (0 if none)."""
  idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(idx) + 1 if idx else 0


def resize_vit_pos_embed(array, target):
  """`Rules.resize` hook: a ViT position embedding [1, 1 + g*g, D] to the model's grid."""
  grid = int(round((target[1] - 1) ** 0.5))
  old = int(round((array.shape[1] - 1) ** 0.5))
  return resize_pos_embed(array, grid), f'position embedding resized {old}x{old} -> {grid}x{grid} (bicubic)'


def _first_match(rules, key):
  for pattern, value in rules:
    if re.search(pattern, key):
      return value
  return None


def assign(model: nnx.Module, tensors: Mapping[str, np.ndarray], rules: Rules, report: Report,
           *, strict: bool = True) -> None:
  """Copy `tensors` into `model`'s Variables in place, recording everything in `report`.

  Raises ConversionError for a shape mismatch, for model weights absent from the checkpoint
  (unless expected), for two checkpoint keys that should hold one shared Variable but differ,
  and, with `strict`, for checkpoint keys that nothing reads and no rule expects.
  """
  used: set[str] = set()
  assigned: dict[int, str] = {}  # id(Variable) -> checkpoint key it was read from (for ties)
  problems = []
  for path, var in named_variables(model):
    key = torch_name(path)
    for pattern, repl in rules.path_renames:
      key = re.sub(pattern, repl, key)
    target = tuple(var.shape)
    if key not in tensors:
      why = _first_match(rules.expected_missing, key)
      if why is None and id(var) in assigned:
        continue  # a tied Variable the checkpoint stores only under its other name
      if why is None and strict:
        problems.append(f'missing key {key!r} (model expects shape {target})')
      else:
        report.missing[key] = why or 'absent from the checkpoint; left at its initial value'
      continue
    used.add(key)
    array = to_flax_layout(path, tensors[key])
    if array.shape != target:
      hook = _first_match(rules.resize, path)
      if hook is not None:
        array, how = hook(array, target)
        report.resized[key] = how
      if array.shape != target:
        problems.append(f'shape mismatch for {key!r}: checkpoint {tuple(tensors[key].shape)}, '
                        f'model expects {target} (after the torch->flax layout change)')
        continue
    if id(var) in assigned:  # a tied Variable: both checkpoint copies must agree
      other_key = assigned[id(var)]
      if not np.array_equal(np.asarray(var.get_value()), array):
        problems.append(f'{key!r} and {other_key!r} are one shared weight in this model but differ '
                        'in the checkpoint')
      else:
        report.skipped[key] = f'tied to {other_key}'
      continue
    # A copy: an alias of a memory-mapped source would keep the whole file mapped.
    var.set_value(jnp.array(array, dtype=var.get_value().dtype, copy=True))
    assigned[id(var)] = key
    report.converted.append(key)
  unexpected = []
  for key in sorted(set(tensors) - used):
    why = _first_match(rules.expected_unused, key)
    if why is None:
      unexpected.append(key)
      if not strict:
        report.skipped[key] = 'not used by this model'
    else:
      report.skipped[key] = why
  if unexpected and strict:
    problems.append(f'{len(unexpected)} checkpoint keys are not used by this model: '
                    f'{unexpected[:20]}{" ..." if len(unexpected) > 20 else ""}')
  if problems:
    raise ConversionError(f'{report.source} ({report.layout} layout, task {report.task!r}):\n  '
                          + '\n  '.join(problems))
