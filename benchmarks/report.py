"""The run's header (machine, versions, peaks) and the table."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import platform

import jax
import torch

from benchmarks.settings import BF16_TOL, CORES, NOMINAL_BF16_TFLOPS, RUN, TOL


def nominal_peak_tflops(given: float | None) -> float | None:
  """The accelerator's datasheet peak for MFU: `given`, else, in bf16 on a known GPU, its dense
  bf16 peak; None otherwise (a CPU has no datasheet figure to trust: `of peak` is measured)."""
  if given or RUN.dtype != 'bfloat16' or jax.default_backend() == 'cpu':
    return given
  kind = jax.devices()[0].device_kind
  return next((tflops for name, tflops in NOMINAL_BF16_TFLOPS if name in kind), None)


def machine_info(scale: str, repeats: int, peaks: dict[str, float], nominal_tflops: float | None) -> dict:
  cpu = platform.processor()
  with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  versions = {}
  for package in ('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'open_clip_torch'):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      versions[package] = importlib.metadata.version(package)
  return {'cpu': cpu, 'cores': CORES, 'torch_threads': torch.get_num_threads(), 'jax_backend': jax.default_backend(),
          'jax_device': jax.devices()[0].device_kind, 'torch_device': str(RUN.torch_device),
          'versions': versions, 'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
          'scale': scale, 'repeats': repeats, 'dtype': RUN.dtype,
          'tolerance': TOL if RUN.dtype == 'float32' else {'relative': BF16_TOL},
          'peak_gflops_per_s_jax': peaks['jax'], 'peak_gflops_per_s_torch': peaks['torch'],
          'nominal_peak_tflops': nominal_tflops}


def table(rows: list[dict]) -> str:
  columns = [('workload', 'workload', '{}'), ('size', 'size', '{}'), ('jax_s', 'jax s', '{:.4f}'),
             ('torch_s', 'torch s', '{:.4f}'), ('ratio', 'torch/jax', '{:.2f}'),
             ('items_per_s_jax', 'jax items/s', '{:.2f}'), ('items_per_s_torch', 'torch items/s', '{:.2f}'),
             ('gflops', 'GFLOP', '{:.1f}'), ('gflops_per_s', 'GFLOP/s', '{:.1f}'),
             ('peak_fraction', 'of peak', '{:.0%}'), ('mfu', 'MFU', '{:.0%}'), ('max_abs_diff', 'max diff', '{:.1e}'),
             ('max_rel_diff', 'max rel diff', '{:.1e}'), ('token_agreement', 'same tokens', '{:.0%}'),
             ('rss', 'peak RSS GiB jax/torch/both', '{}'), ('attn', 'attention jax/torch', '{}')]
  cells = [[title for _, title, _ in columns]]
  for row in rows:
    rss = row.get('peak_rss_gib', {})
    attention = row.get('attention', {})
    row = {**row, 'rss': '/'.join(f'{rss[k]:.1f}' if k in rss else '-' for k in ('jax', 'torch', 'both')),
           'attn': f'{attention.get("jax", "-")}/{attention.get("torch", "-")}'}
    cells.append([fmt.format(row[key]) if row.get(key) is not None else '-' for key, _, fmt in columns])
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = ['  '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
  lines.insert(1, '-' * len(lines[0]))
  lines += [f'{row["workload"]}: {row["error"]}' for row in rows if 'error' in row]
  return '\n'.join(lines)
