"""blip_jax against its PyTorch references, same random weights on both sides (issue #9).

    python benchmarks/run.py --quick                       # 2 layers, small batches: minutes on 2 cores
    python benchmarks/run.py --out results.json            # the full sizes
    python benchmarks/run.py --workloads blip_vit,clip --repeats 7
    python benchmarks/run.py --dtype bfloat16              # on a GPU: bf16 throughput and MFU

Each workload builds the PyTorch reference (HF transformers' BLIP / BLIP-2 classes, open_clip)
from a config with random weights, converts its state dict with `blip_jax.convert.load_torch`
(as the tests do), checks that both sides give the same outputs (a workload whose outputs differ
by more than `TOL` is not timed), then times the two sides alternately after a warm-up call that
also compiles the JAX side. Each side runs in a process of its own, built from the same seeds
(so the same weights), so that the two frameworks' models and activations never share one
process's memory; `--isolation sequential` times one side after the other for workloads where
even two processes do not fit. Reported per workload: median seconds per call, items/s, the speed
ratio torch_s / jax_s (> 1: blip_jax is faster), and the JAX side's GFLOP/s (FLOPs from XLA's
cost analysis of the compiled function) as a fraction of the best fp32 matmul GFLOP/s measured
during the run. Weights are random, so nothing is downloaded: it runs offline.

On a machine shared with other work, PyTorch's OpenMP threads suffer much more than XLA's when a
core is taken away (each parallel region waits for its slowest thread); `--torch-threads 1`
shows how much of a gap is that.

`--dtype bfloat16` runs both sides in mixed precision as users train and serve on accelerators:
blip_jax models with `dtype='bfloat16'` (bf16 compute, fp32 parameters, fp32 softmax) against the
PyTorch models under `torch.autocast(dtype=torch.bfloat16)`, and measures the bf16 matmul peak.
The two sides then agree only to bf16 precision: floating outputs are compared relative to the
reference's largest magnitude (`BF16_TOL`), and generated tokens, which may part at a near-tie,
are reported as the fraction that agree rather than checked. PyTorch runs on `--torch-device`
(default: cuda when there is one), JAX on its default backend. The `mfu` column (model FLOPs
utilisation) divides the JAX side's GFLOP/s by the accelerator's datasheet dense bf16 peak
(`NOMINAL_BF16_TFLOPS`, or `--peak-tflops`); on CPU there is none, and `of peak` is against the
matmul peak measured during the run.

Output: an aligned table on stdout (progress on stderr); with --out a JSON list whose first
element is {"header": {machine, devices, dtype, versions, date, measured peaks}} and then one
object per workload: {workload, size, jax_s, torch_s, ratio, items_per_s_jax, items_per_s_torch,
gflops, gflops_per_s, peak_fraction, mfu, max_abs_diff, max_rel_diff, token_agreement, isolation,
peak_rss_gib: {jax, torch, both}} (plus "error" for a workload that failed). The diffs are over
floating outputs, `token_agreement` over generated tokens, each only where there are such
outputs; `mfu` only where the peak is known. `peak_rss_gib`: each side's process peak, and the
peak of their sum sampled ten times a second.
Exit status 1 when any workload failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Both sides may share one accelerator: JAX would otherwise take 75% of its memory when it starts.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))  # `python benchmarks/run.py`

import jax  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import differences, first_outputs, measure_peaks, mismatch, run_workload  # noqa: E402
from benchmarks.report import machine_info, nominal_peak_tflops, table  # noqa: E402
from benchmarks.settings import CORES, RUN, configure, log  # noqa: E402
from benchmarks.workloads import SCALES, SEQUENTIAL, WORKLOADS  # noqa: E402

__all__ = ['WORKLOADS', 'configure', 'differences', 'first_outputs', 'mismatch', 'main']


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='reduced sizes (2 layers, small batches): --scale quick')
  parser.add_argument('--scale', choices=SCALES, default='full',
                      help="'tiny' (1 layer, tiny images) only checks the wiring; its timings mean little")
  parser.add_argument('--out', help='write the results as JSON to this file')
  parser.add_argument('--workloads', default=','.join(WORKLOADS),
                      help=f'comma-separated subset of: {", ".join(WORKLOADS)}')
  parser.add_argument('--repeats', type=int, help='timed calls per side (default 3 quick, 5 full)')
  parser.add_argument('--isolation', choices=('alternate', 'sequential'),
                      help="each side runs in its own process; 'alternate' keeps both alive and times them "
                           "in turn (fair under load from other work), 'sequential' times all of the JAX "
                           "side's calls, ends it, then the PyTorch side's (when two sides do not fit in memory). "
                           "Default: alternate, except sequential for the full-size training step (16.4 + 12.8 GiB)")
  parser.add_argument('--torch-threads', type=int, default=CORES,
                      help='PyTorch intra-op threads (default: the cores this process may use, as XLA does); '
                           'on a machine busy with other work, OpenMP threads that wait for each other slow '
                           'PyTorch down far more than XLA')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help="both sides' compute dtype: bfloat16 is blip_jax's model dtype='bfloat16' (fp32 "
                           "parameters) against PyTorch under torch.autocast, the way accelerators are used")
  parser.add_argument('--torch-device', default='cuda' if torch.cuda.is_available() else 'cpu',
                      help='where PyTorch runs (default: cuda when there is one); JAX uses its default backend')
  parser.add_argument('--peak-tflops', type=float,
                      help='datasheet peak TFLOP/s for the MFU column (default: known GPUs\' dense bf16 peak '
                           'in bf16, none otherwise)')
  args = parser.parse_args(argv)
  names = [n for n in args.workloads.split(',') if n]
  unknown = [n for n in names if n not in WORKLOADS]
  if unknown:
    parser.error(f'unknown workload(s) {", ".join(unknown)}; expected some of {", ".join(WORKLOADS)}')
  scale = 'quick' if args.quick else args.scale
  repeats = args.repeats or (5 if scale == 'full' else 3)
  torch.set_num_threads(args.torch_threads)
  configure(args.dtype, args.torch_device)
  log(f'{CORES} cores, PyTorch on {RUN.torch_device} ({args.torch_threads} CPU threads), JAX on '
      f'{jax.devices()[0].device_kind}, {RUN.dtype}')
  peaks = measure_peaks({})
  rows = []
  for name in names:
    try:
      rows.append(run_workload(name, scale, repeats, peaks, torch_threads=args.torch_threads,
                               isolation=args.isolation or SEQUENTIAL.get((name, scale), 'alternate')))
    except Exception as e:  # one broken workload should not hide the others' numbers
      log(f'[{name}] FAILED: {type(e).__name__}: {e}')
      rows.append({'workload': name, 'error': f'{type(e).__name__}: {e}'})
  nominal = nominal_peak_tflops(args.peak_tflops)
  for row in rows:
    if 'gflops_per_s' in row:
      row['peak_fraction'] = row['gflops_per_s'] / peaks['jax']
      if nominal:
        row['mfu'] = row['gflops_per_s'] / (nominal * 1e3)
  header = machine_info(scale, repeats, peaks, nominal)
  print(f'{header["cpu"]}, {CORES} cores, JAX on {header["jax_device"]}, PyTorch on {RUN.torch_device}, '
        f'jax {header["versions"].get("jax")}, torch {header["versions"].get("torch")}; {RUN.dtype} matmul peak '
        f'(best of the run): jax {peaks["jax"]:.0f} GFLOP/s, torch {peaks["torch"]:.0f} GFLOP/s'
        + (f'; MFU against {nominal:.0f} TFLOP/s' if nominal else ''))
  print(table(rows))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump([{'header': header}, *rows], f, indent=1)
    log(f'wrote {args.out}')
  return 1 if any('error' in row for row in rows) else 0


if __name__ == '__main__':
  sys.exit(main())
