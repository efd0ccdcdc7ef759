"""Read PyTorch checkpoints as lazily loaded {key: numpy array} stores.

Sources: an in-memory state dict (torch tensors or numpy arrays), a `.pth` / `.pt` / `.bin`
pickle (state dict at the top level or under 'model' / 'state_dict', `module.` prefixes
stripped; memory-mapped; `weights_only`: no code runs), an OpenAI TorchScript archive (its
weights only, read by `torchscript.py` without running it), a `.safetensors` file (memory-mapped,
read with numpy, no torch needed), or a HuggingFace model folder (`config.json` +
`model.safetensors` / `pytorch_model.bin`, sharded `*.index.json`).

Tensors are turned into numpy arrays only when read, one at a time, so converting needs little
more memory than the model being built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import numpy as np

from blip_jax.convert import torchscript

WRAPPER_KEYS = ('model', 'state_dict', 'module')


def to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if type(value).__module__.startswith('torch'):
    import torch  # only reached when the caller already holds torch tensors
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:  # numpy has no bfloat16
      value = value.float()
    return value.numpy()
  return np.asarray(value)


class TensorStore(MutableMapping):
  """Checkpoint tensors by key; each is loaded and converted to numpy when read."""

  def __init__(self, loaders: dict[str, Callable[[], Any]] | None = None):
    self._loaders = dict(loaders or {})

  def __getitem__(self, key: str) -> np.ndarray:
    return to_numpy(self._loaders[key]())

  def __setitem__(self, key: str, value) -> None:
    self._loaders[key] = lambda: value

  def __delitem__(self, key: str) -> None:
    del self._loaders[key]

  def __iter__(self) -> Iterator[str]:
    return iter(self._loaders)

  def __len__(self) -> int:
    return len(self._loaders)

  def renamed(self, rename: Callable[[str], str]) -> TensorStore:
    """The same tensors under new keys (still unloaded); two keys may not meet."""
    out = {}
    for key, loader in self._loaders.items():
      new = rename(key)
      if new in out:
        raise ValueError(f'two checkpoint keys map to {new!r}')
      out[new] = loader
    return TensorStore(out)


@dataclasses.dataclass
class Checkpoint:
  tensors: TensorStore
  source: str  # a path, or '<state dict>'
  hf_config: dict[str, Any] | None = None  # config.json of an HF folder
  torchscript: bool = False  # a TorchScript archive (OpenAI's CLIP releases)
  files: tuple[str, ...] = ()  # the files read, for provenance


def _unwrap(obj: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Find the state dict inside a training checkpoint (tensors only)."""
  for key in WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  tensors = {}
  for key, value in obj.items():
    if not hasattr(value, 'shape'):
      continue  # epoch counters, configs and the like next to the weights
    tensors[key] = value
  if not tensors:
    raise ValueError(f'{source}: no tensors found (looked at the top level and under {WRAPPER_KEYS})')
  return tensors


def _load_pickle(path: str) -> dict[str, Any]:
  if torchscript.is_torchscript(path):
    return torchscript.read_state_dict(path)  # without torch.jit.load: nothing in the archive runs
  import torch
  try:
    # mmap: tensors stay on disk until read (needs the zip format of torch >= 1.6).
    return torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
  except Exception as e:  # noqa: BLE001 - any unpickling failure becomes one clear message
    refused = re.search(r'WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)', str(e), re.S)
    if refused:  # torch's text suggests weights_only=False, which blip_jax never uses: not repeated
      raise ValueError(f'{path}: could not read the PyTorch checkpoint: not a PyTorch file, or its pickle holds '
                       f'objects other than tensors, which are never run ({" ".join(refused[1].split())})') from e
    raise ValueError(f'{path}: could not read the PyTorch checkpoint ({type(e).__name__}: {e})') from e


def _safetensors_loaders(path: str) -> dict[str, Callable[[], np.ndarray]]:
  from safetensors import safe_open
  try:
    handle = safe_open(path, framework='numpy')
    keys = list(handle.keys())
  except Exception as e:  # noqa: BLE001
    raise ValueError(f'{path}: could not read the safetensors file ({e})') from e
  return {k: (lambda k=k: handle.get_tensor(k)) for k in keys}


def _file_loaders(path: str) -> dict[str, Callable[[], Any]]:
  if path.endswith('.safetensors'):
    return _safetensors_loaders(path)
  if path.endswith('.index.json'):
    with open(path) as f:
      index = json.load(f)
    folder = os.path.dirname(path)
    loaders = {}
    for shard in sorted(set(index['weight_map'].values())):
      # A plain file name: the shard lies beside the index. (Its realpath may not: the HF cache
      # keeps snapshot files as symlinks into blobs/.)
      if os.path.basename(shard) != shard or shard in ('', '.', '..'):
        raise ValueError(f'{path}: weight_map names {shard!r}, outside the index\'s folder; shards must lie beside it')
      loaders.update(_file_loaders(os.path.join(folder, shard)))
    return loaders
  tensors = _unwrap(_load_pickle(path), path)
  return {k: (lambda v=v: v) for k, v in tensors.items()}


def _strip_module(loaders):
  """Drop DDP's `module.` prefix."""
  return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in loaders.items()}


HF_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                   'pytorch_model.bin.index.json')


def read_checkpoint(source) -> Checkpoint:
  """Open `source` (a path or an in-memory state dict) without loading its tensors yet."""
  if isinstance(source, Checkpoint):
    return source
  if isinstance(source, Mapping):
    tensors = _unwrap(source, '<state dict>')
    return Checkpoint(TensorStore(_strip_module({k: (lambda v=v: v) for k, v in tensors.items()})),
                      '<state dict>')
  path = os.fspath(source)
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint not found: {path}')
  hf_config = None
  if os.path.isdir(path):
    found = [f for f in HF_WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
    if not found:
      raise FileNotFoundError(f'{path}: a model folder needs one of {HF_WEIGHT_FILES}')
    config_path = os.path.join(path, 'config.json')
    if os.path.exists(config_path):
      try:
        with open(config_path, encoding='utf-8') as f:
          hf_config = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{config_path}: not valid JSON ({e})') from None
    path = os.path.join(path, found[0])
  elif os.path.getsize(path) == 0:
    raise ValueError(f'{path}: the file is empty (0 bytes), not a checkpoint')
  loaders = _strip_module(_file_loaders(path))
  return Checkpoint(TensorStore(loaders), path, hf_config,
                    torchscript=os.path.isfile(path) and torchscript.is_torchscript(path), files=(path,))


def read_checkpoints(sources) -> Checkpoint:
  """Several sources as one checkpoint (BLIP-2: LAVIS weights + ViT + LLM); a key present in two
  sources is an error."""
  parts = [read_checkpoint(s) for s in sources]
  if len(parts) == 1:
    return parts[0]
  merged: dict[str, Callable[[], Any]] = {}
  owner: dict[str, str] = {}
  for part in parts:
    for key, loader in part.tensors._loaders.items():
      if key in merged:
        raise ValueError(f'key {key!r} is in both {owner[key]} and {part.source}')
      merged[key], owner[key] = loader, part.source
  hf_config = next((p.hf_config for p in parts if p.hf_config), None)
  return Checkpoint(TensorStore(merged), ' + '.join(p.source for p in parts), hf_config,
                    torchscript=any(p.torchscript for p in parts),
                    files=tuple(f for p in parts for f in p.files))
