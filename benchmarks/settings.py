"""What both sides of every workload compute in and compare to: tolerances, dtype, devices."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

import numpy as np
import torch

TOL = 1e-4  # fp32 on both sides; the tests hold 1e-5 on tiny models, full-size sums drift a little more
# bf16 on both sides: max |jax - torch| over the reference's largest |value|, per output. bf16 keeps
# 8 bits of mantissa (0.4% per rounding); a dozen layers of differently ordered sums stay within 5%.
BF16_TOL = 5e-2
# Datasheet dense bf16 TFLOP/s by `jax.devices()[0].device_kind` (first match), for MFU.
NOMINAL_BF16_TFLOPS = (('H100 PCIe', 756.0), ('H100', 989.4), ('H200', 989.4), ('A100', 312.0))
CORES = len(os.sched_getaffinity(0))
CLS, SEP, DEC, ENC = 101, 102, 30522, 30523  # bert-base-uncased + BLIP's [DEC] / [ENC]


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Settings:
  """What both sides compute in and where PyTorch runs, set by `configure` in each process before
  a workload is built."""
  dtype: str = 'float32'  # or 'bfloat16'
  torch_device: torch.device = torch.device('cpu')


RUN = Settings()


def configure(dtype: str, torch_device: str) -> None:
  RUN.dtype, RUN.torch_device = dtype, torch.device(torch_device)


def compute_dtype(*towers: str, **extra: dict) -> dict:
  """`load_torch` config overrides that make each named tower compute in `RUN.dtype` (`extra`:
  more fields for a tower)."""
  return {t: {**extra.get(t, {}), 'dtype': RUN.dtype} for t in (*towers, *extra)}


def torch_autocast():
  """PyTorch's mixed precision, the counterpart of a blip_jax model with `dtype='bfloat16'`."""
  if RUN.dtype == 'float32':
    return contextlib.nullcontext()
  return torch.autocast(RUN.torch_device.type, dtype=getattr(torch, RUN.dtype))


def torch_sync() -> None:
  """Waits for PyTorch's queued GPU work (JAX's side waits with `block_until_ready`)."""
  if RUN.torch_device.type == 'cuda':
    torch.cuda.synchronize(RUN.torch_device)


def torch_ids(ids: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(ids).long().to(RUN.torch_device)
