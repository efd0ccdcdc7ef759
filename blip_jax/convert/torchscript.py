"""The weights of a TorchScript archive (OpenAI's CLIP `.pt` releases), read without running it.

`torch.jit.load` rebuilds the archive's module and its TorchScript code; a file from an unknown
source should not get that far. An archive is a zip: `data.pkl` pickles the module tree (objects
of `__torch__.*` classes holding their attributes), `data/N` holds the tensors' raw storages, and
`code/__torch__/...py` declares each class with its `__parameters__` and `__buffers__`. This
module unpickles `data.pkl` with an unpickler that builds the `__torch__` objects as plain
records and accepts no other class than the tensor rebuilder, an OrderedDict and the storage
types; storages become tensors straight from the zip's bytes; the class declarations are read as
text (never executed) to keep, as `state_dict()` does, each module's parameters and buffers.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from typing import Any

import numpy as np

# storage class in data.pkl -> numpy dtype of its bytes (bfloat16 read as its 16 bits, see below)
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': np.uint16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class TorchScriptError(ValueError):
  pass


def is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(name.endswith('constants.pkl') for name in z.namelist())


class _Record:
  """An object of a TorchScript class: its qualified name and attributes, nothing callable.
  (Unpickling makes it with `__new__` and hands its attributes to `__setstate__`.)"""

  qualname = ''
  attributes: dict = {}

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise TorchScriptError(f'{self.qualname}: expected a dict of attributes, got {type(state).__name__}')
    self.attributes = state


def _record_class(qualname: str):
  return type('Record', (_Record,), {'qualname': qualname})


class _Storage:
  def __init__(self, dtype, bfloat16: bool):
    self.dtype, self.bfloat16 = dtype, bfloat16


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
  array, bfloat16 = storage
  itemsize = array.dtype.itemsize
  if all(size) and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= array.size:
    raise TorchScriptError(f'a tensor of size {tuple(size)} reaches past its storage of {array.size} elements')
  view = np.lib.stride_tricks.as_strided(array[offset:], tuple(size), tuple(st * itemsize for st in stride))
  view = view.copy()  # contiguous, and free of the storage (0-d stays 0-d, unlike ascontiguousarray)
  if bfloat16:  # numpy has no bfloat16: the top 16 bits of a float32
    view = (view.astype(np.uint32) << 16).view(np.float32)
  return view


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(file)
    self.archive, self.prefix, self.path = archive, prefix, path

  def find_class(self, module, name):
    if module.startswith('__torch__'):
      return _record_class(f'{module}.{name}')
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _Storage(_STORAGE_DTYPES[name], name == 'BFloat16Storage')
    raise TorchScriptError(f'{self.path}: data.pkl refers to {module}.{name}, which a TorchScript archive of '
                           'weights does not need; refusing to load it')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage' and isinstance(pid[1], _Storage)):
      raise TorchScriptError(f'{self.path}: unexpected persistent id {pid!r} in data.pkl')
    _, storage, key, _, _ = pid
    data = self.archive.read(f'{self.prefix}/data/{key}')
    return np.frombuffer(data, storage.dtype).copy(), storage.bfloat16


_DECLARATION = re.compile(r'^class (\w+)\(.*?\):\n((?:[ \t]+.*\n|\n)*)', re.M)
_NAMES = re.compile(r'^\s+__(parameters|buffers)__ = \[(.*?)\]', re.M)


def _state_names(archive: zipfile.ZipFile, prefix: str, qualname: str, path: str) -> set[str]:
  """The parameters and buffers a TorchScript class declares (read from its code file as text)."""
  module, _, cls = qualname.rpartition('.')
  source_file = f'{prefix}/code/{module.replace(".", "/")}.py'
  try:
    source = archive.read(source_file).decode()
  except KeyError:
    raise TorchScriptError(f'{path}: {source_file} (the declaration of {qualname}) is missing') from None
  for match in _DECLARATION.finditer(source + '\n'):
    if match.group(1) == cls:
      found = dict(_NAMES.findall(match.group(2)))
      return {n.strip().strip('"\'') for kind in ('parameters', 'buffers') for n in found.get(kind, '').split(',')
              if n.strip()}
  raise TorchScriptError(f'{path}: {source_file} does not declare class {cls}')


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """What `torch.jit.load(path).state_dict()` returns, as numpy arrays, without loading the module."""
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if not pickles:
      raise TorchScriptError(f'{path}: no data.pkl in the archive')
    prefix = pickles[0].split('/')[0]
    with archive.open(pickles[0]) as f:
      try:
        root = _Unpickler(f, archive, prefix, path).load()
      except TorchScriptError:
        raise
      except Exception as e:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise TorchScriptError(f'{path}: data.pkl does not unpickle ({type(e).__name__}: {e})') from None
    if not isinstance(root, _Record):
      raise TorchScriptError(f'{path}: data.pkl holds {type(root).__name__}, expected a TorchScript module')
    state: dict[str, Any] = {}
    declared: dict[str, set[str]] = {}

    def walk(record: _Record, prefix_key: str):
      if record.qualname not in declared:
        declared[record.qualname] = _state_names(archive, prefix, record.qualname, path)
      for name, value in record.attributes.items():
        if isinstance(value, _Record):
          walk(value, f'{prefix_key}{name}.')
        elif isinstance(value, np.ndarray) and name in declared[record.qualname]:
          state[f'{prefix_key}{name}'] = value

    walk(root, '')
  return state
