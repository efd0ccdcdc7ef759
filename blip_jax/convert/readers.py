"""Read PyTorch checkpoints into flat {key: numpy array} dicts.

Sources: an in-memory state dict (torch tensors or numpy arrays), a `.pth` / `.pt` / `.bin`
pickle (state dict at the top level or under 'model' / 'state_dict', `module.` prefixes
stripped), a `.safetensors` file (read with numpy, no torch needed), or a HuggingFace model
folder (`config.json` + `model.safetensors` / `pytorch_model.bin`, sharded `*.index.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

WRAPPER_KEYS = ('model', 'state_dict', 'module')


@dataclasses.dataclass
class Checkpoint:
  tensors: dict[str, np.ndarray]
  source: str  # a path, or '<state dict>'
  hf_config: dict[str, Any] | None = None  # config.json of an HF folder
  torchscript: bool = False  # a TorchScript archive (OpenAI's CLIP releases)


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


def _unwrap(obj: Mapping[str, Any], source: str) -> dict[str, Any]:
  """Find the state dict inside a training checkpoint and strip DDP `module.` prefixes."""
  for key in WRAPPER_KEYS:
    if key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
      break
  tensors = {}
  for key, value in obj.items():
    if not hasattr(value, 'shape'):
      continue  # epoch counters, configs and the like next to the weights
    tensors[key[len('module.'):] if key.startswith('module.') else key] = value
  if not tensors:
    raise ValueError(f'{source}: no tensors found (looked at the top level and under {WRAPPER_KEYS})')
  return tensors


def _is_torchscript(path: str) -> bool:
  import zipfile
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(name.endswith('constants.pkl') for name in z.namelist())


def _load_pickle(path: str) -> dict[str, Any]:
  import torch
  if _is_torchscript(path):
    return torch.jit.load(path, map_location='cpu').state_dict()
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 - any unpickling failure becomes one clear message
    raise ValueError(f'{path}: could not read the PyTorch checkpoint: {e}') from e


def _load_file(path: str) -> dict[str, Any]:
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return load_file(path)
  if path.endswith('.index.json'):
    with open(path) as f:
      index = json.load(f)
    folder = os.path.dirname(path)
    tensors = {}
    for shard in sorted(set(index['weight_map'].values())):
      tensors.update(_load_file(os.path.join(folder, shard)))
    return tensors
  return _load_pickle(path)


HF_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                   'pytorch_model.bin.index.json')


def read_checkpoint(source) -> Checkpoint:
  """Read `source` (a path or an in-memory state dict) into numpy arrays."""
  if isinstance(source, Checkpoint):
    return source
  if isinstance(source, Mapping):
    tensors = _unwrap(source, '<state dict>')
    return Checkpoint({k: to_numpy(v) for k, v in tensors.items()}, '<state dict>')
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
      with open(config_path) as f:
        hf_config = json.load(f)
    path = os.path.join(path, found[0])
  tensors = _unwrap(_load_file(path), path)
  return Checkpoint({k: to_numpy(v) for k, v in tensors.items()}, path, hf_config,
                    torchscript=os.path.isfile(path) and _is_torchscript(path))
