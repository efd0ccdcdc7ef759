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
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

# Both sides may share one accelerator: JAX would otherwise take 75% of its memory when it starts.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from blip_jax import generate, objectives
from blip_jax.convert import load_torch
from blip_jax.convert.readers import to_numpy
from blip_jax.models import blip as blip_models
from blip_jax.train import state as train_state
from blip_jax.train import tasks as train_tasks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
import torch_refs  # noqa: E402  (the tests' PyTorch reference helpers)

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


# ------------------------------------------------------------------------------------ harness


@dataclasses.dataclass
class Workload:
  """One benchmark: a jitted JAX function with its arguments and a PyTorch callable that do the
  same work on the same weights and inputs."""
  size: str  # what is computed, in words
  items: int  # images / texts / captions / pairs per call, for items/s
  jax_fn: Any  # a `jax.jit`-wrapped function, called as jax_fn(*jax_args)
  jax_args: tuple
  torch_fn: Callable[[], Any]  # no arguments; under torch.inference_mode() unless `grad`, autocast in bf16
  # Each side's output as compared (leaves in order), computed in that side's process; by default
  # the output itself.
  jax_result: Callable[[Any], Any] | None = None
  torch_result: Callable[[Any], Any] | None = None
  # For a training step: the next call's arguments from this call's output (the new state).
  carry: Callable[[Any, tuple], tuple] | None = None
  # FLOPs that XLA's cost analysis misses: it counts a while-loop body once, not per iteration.
  extra_flops: Callable[[], float] | None = None
  grad: bool = False


def as_numpy(tree) -> list[np.ndarray]:
  """The leaves of a JAX or PyTorch output as numpy arrays on the host (picklable: they cross
  processes)."""
  return [to_numpy(x) for x in jax.tree.leaves(tree, is_leaf=torch.is_tensor)]


def differences(jax_out, torch_out) -> dict:
  """How far apart the two sides' outputs are. Over floating outputs: `max_abs_diff`, and
  `max_rel_diff`, the largest of max |jax - torch| / max |torch| per output. Over integer outputs
  (generated tokens): `token_agreement`, the fraction of equal values. A key is absent when no
  output is of its kind."""
  ours, theirs = as_numpy(jax_out), as_numpy(torch_out)
  if len(ours) != len(theirs):
    raise ValueError(f'{len(ours)} JAX outputs against {len(theirs)} PyTorch outputs')
  result, same, total = {}, 0, 0
  for a, b in zip(ours, theirs):
    if a.shape != b.shape:
      raise ValueError(f'output shapes differ: JAX {a.shape}, PyTorch {b.shape}')
    if b.dtype.kind in 'iub':
      same, total = same + int((a == b).sum()), total + a.size
      continue
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(np.abs(a - b).max(initial=0.0))
    relative = diff / max(float(np.abs(b).max(initial=0.0)), 1e-30)
    result['max_abs_diff'] = max(result.get('max_abs_diff', 0.0), diff)
    result['max_rel_diff'] = max(result.get('max_rel_diff', 0.0), relative)
  if total:
    result['token_agreement'] = same / total
  return result


def mismatch(diff: dict, dtype: str) -> str | None:
  """Why the two sides' outputs (`differences`) do not count as the same computation in `dtype`;
  None when they do. In fp32 floating outputs agree to `TOL` and tokens exactly; in bf16 floating
  outputs agree to `BF16_TOL` relative, and tokens are reported, not checked (bf16 logits may rank
  a near-tie the other way)."""
  if dtype == 'float32':
    if not diff.get('max_abs_diff', 0.0) <= TOL:
      return f'outputs differ: max abs diff {diff["max_abs_diff"]:.3g} > {TOL}'
    if diff.get('token_agreement', 1.0) < 1.0:
      return f'generated tokens differ: {diff["token_agreement"]:.1%} agree'
  elif not diff.get('max_rel_diff', 0.0) <= BF16_TOL:
    return f'outputs differ: max relative diff {diff["max_rel_diff"]:.3g} > {BF16_TOL} ({dtype})'
  return None


def timed_alternately(fns: dict[str, Callable[[], Any]], repeats: int, *,
                      timed_by_callee: bool = False) -> dict[str, list[float]]:
  """Seconds per call of each function, calling them in turn `repeats` times, so that load from
  other processes on the machine falls on both sides alike. `timed_by_callee`: each function
  returns its own seconds (a side's process times its call, without the pipe's round trip)."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      seconds = fn()
      times[name].append(seconds if timed_by_callee else time.perf_counter() - start)
  return times


def cost_flops(compiled) -> float:
  """FLOPs of a compiled JAX function; `cost_analysis()` is a dict or (older JAX) a list of them."""
  cost = compiled.cost_analysis()
  if isinstance(cost, dict):
    cost = [cost]
  return float(sum(c.get('flops', 0.0) for c in cost or []))


def measure_peaks(peaks: dict[str, float], tries: int = 3) -> dict[str, float]:
  """Best GFLOP/s of an n x n matmul in `RUN.dtype` in JAX and in PyTorch, kept in `peaks` as the
  best seen so far: called before every workload, so that a moment of load from other processes
  does not set the machine's peak (and the fractions of it) for the whole run. n = 2048 on CPU;
  an accelerator needs 8192 to reach its peak."""
  n = 2048 if jax.default_backend() == 'cpu' else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(RUN.dtype))
  jax_mm = jax.jit(jnp.matmul)
  t = torch.randn(n, n, dtype=getattr(torch, RUN.dtype), device=RUN.torch_device)

  def torch_mm():
    torch.mm(t, t)
    torch_sync()

  jax_mm(a, a).block_until_ready()
  with torch.inference_mode():
    torch_mm()
    times = timed_alternately({'jax': lambda: jax_mm(a, a).block_until_ready(), 'torch': torch_mm}, tries)
  for name, ts in times.items():
    peaks[name] = max(peaks.get(name, 0.0), 2 * n ** 3 / min(ts) / 1e9)
  return peaks


def jax_runner(w: Workload):
  """The workload's JAX call, compiled ahead of time (that gives the cost analysis and keeps
  compilation out of every timing), and its FLOPs per call. Returns (run_jax, flops)."""
  compiled = w.jax_fn.lower(*w.jax_args).compile()
  # Inputs on the device once, as the PyTorch side's are: not copied from the host every call.
  args = [jax.tree.map(lambda x: jax.device_put(x) if isinstance(x, np.ndarray) else x, w.jax_args)]

  def run_jax():
    out = jax.block_until_ready(compiled(*args[0]))
    if w.carry:
      args[0] = w.carry(out, args[0])
    return out

  return run_jax, cost_flops(compiled) + (w.extra_flops() if w.extra_flops else 0.0)


def torch_runner(w: Workload):
  def run_torch():
    with contextlib.nullcontext() if w.grad else torch.inference_mode(), torch_autocast():
      out = w.torch_fn()
    torch_sync()
    return out

  return run_torch


def first_outputs(w: Workload):
  """Both sides' compared outputs of their first calls, run in this process (the tests use it).
  Returns (jax_out, torch_out) as lists of numpy arrays."""
  run_jax, _ = jax_runner(w)
  return (w.jax_result or as_numpy)(run_jax()), (w.torch_result or as_numpy)(torch_runner(w)())


# ------------------------------------------------------------------------------- processes
#
# Each side runs in a process of its own (a `Side`), so that one framework's model, optimiser
# state and activations never sit in memory beside the other's: the full-size training step
# needs that to fit in 24 GiB. Both processes build the workload from the same seeds, so the
# weights are the same; each then drops the other framework's half. The parent compares the
# first calls' outputs and, only when they agree, times the sides: alternately, one call each
# in turn ('alternate'), or, where even two idle sides do not fit, all of one side's calls and
# then all of the other's ('sequential').


def _release_memory():
  """Hands memory freed by the last call back to the system (glibc keeps it otherwise, and an
  idle side would hold its peak while the other one runs)."""
  gc.collect()
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL('libc.so.6').malloc_trim(0)


def _side_main(conn, name: str, scale: str, side: str, torch_threads: int, dtype: str, torch_device: str):
  """A side's process: builds the workload, keeps its own half, answers the parent's commands
  ('first': the compared output; 'time': seconds of one call; 'stop'). Each side keeps the other
  framework on the CPU: it only builds the model there (the weights both sides start from)."""
  torch.set_num_threads(torch_threads)
  if side == 'jax':
    configure(dtype, 'cpu')
  else:
    configure(dtype, torch_device)
    jax.config.update('jax_platforms', 'cpu')
  try:
    w = WORKLOADS[name](scale)
    if side == 'jax':
      w.torch_fn = w.torch_result = None
      _release_memory()
      start = time.perf_counter()
      run, flops = jax_runner(w)
      result = w.jax_result or as_numpy
      conn.send(('ready', {'flops': flops, 'compile_s': time.perf_counter() - start, 'size': w.size,
                           'items': w.items}))
    else:
      w.jax_fn = w.jax_args = w.jax_result = w.carry = w.extra_flops = None
      _release_memory()
      run, result = torch_runner(w), w.torch_result or as_numpy
      conn.send(('ready', {}))
    while True:
      command = conn.recv()
      if command == 'first':
        out = result(run())
        _release_memory()
        conn.send(('ok', out))
      elif command == 'time':
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        _release_memory()
        conn.send(('ok', seconds))
      else:
        conn.send(('ok', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20))  # KiB -> GiB
        return
  except Exception as e:  # reported by the parent as the workload's error
    conn.send(('error', f'{side} side: {type(e).__name__}: {e}'))


class Side:
  """The parent's handle on one side's process."""

  def __init__(self, name: str, scale: str, side: str, torch_threads: int):
    ctx = multiprocessing.get_context('spawn')  # a fresh interpreter: no state shared with the parent
    self.side = side
    self.conn, child = ctx.Pipe()
    self.process = ctx.Process(target=_side_main, daemon=True,
                               args=(child, name, scale, side, torch_threads, RUN.dtype, str(RUN.torch_device)))
    self.process.start()
    child.close()
    self.info = self._reply()

  def _reply(self):
    try:
      status, value = self.conn.recv()
    except EOFError:
      self.process.join()
      raise RuntimeError(f'the {self.side} side died (exit code {self.process.exitcode}; killed for memory?)')
    if status == 'error':
      raise RuntimeError(value)
    return value

  def call(self, command: str):
    self.conn.send(command)
    return self._reply()

  def stop(self) -> float:
    """Ends the process; returns its peak RSS in GiB."""
    peak = self.call('stop')
    self.process.join()
    return peak

  def kill(self):
    if self.process.is_alive():
      self.process.kill()
      self.process.join()


class RssWatch:
  """Samples the summed RSS of the side processes alive (10 times a second): the peak that both
  sides together need, which the per-process peaks do not show."""

  def __init__(self):
    self.pids, self.peak = set(), 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(0.1):
      total = 0
      for pid in list(self.pids):
        with contextlib.suppress(OSError, ValueError):
          with open(f'/proc/{pid}/status') as f:
            total += next((int(line.split()[1]) for line in f if line.startswith('VmRSS:')), 0)  # 0: exiting
      self.peak = max(self.peak, total)

  def close(self) -> float:
    self._stop.set()
    self._thread.join()
    return self.peak / 2 ** 20  # KiB -> GiB


def run_workload(name: str, scale: str, repeats: int, peaks: dict[str, float], *, torch_threads: int,
                 isolation: str) -> dict:
  row = {'workload': name, 'isolation': isolation}
  watch, sides = RssWatch(), []

  def start(side):
    log(f'[{name}] building the {side} side in its own process')
    sides.append(Side(name, scale, side, torch_threads))
    watch.pids.add(sides[-1].process.pid)
    return sides[-1]

  def stop(side):
    row.setdefault('peak_rss_gib', {})[side.side] = side.stop()
    watch.pids.discard(side.process.pid)

  try:
    jax_side = start('jax')
    info = jax_side.info
    row['size'] = info['size']
    log(f'[{name}] compiled in {info["compile_s"]:.1f} s, {info["flops"] / 1e9:.1f} GFLOP per call')
    jax_out = jax_side.call('first')
    if isolation == 'sequential':
      jax_times = [jax_side.call('time') for _ in range(repeats)]
      stop(jax_side)
    torch_side = start('torch')
    row.update(differences(jax_out, torch_side.call('first')))
    del jax_out
    log(f'[{name}] JAX vs PyTorch: ' + ', '.join(f'{key} {row[key]:.3g}' for key in
                                                  ('max_abs_diff', 'max_rel_diff', 'token_agreement') if key in row))
    error = mismatch(row, RUN.dtype)
    if error:
      row['error'] = error
      log(f'[{name}] NOT TIMED: {error}')
      return row
    measure_peaks(peaks)
    if isolation == 'sequential':
      times = {'jax': jax_times, 'torch': [torch_side.call('time') for _ in range(repeats)]}
    else:
      times = timed_alternately({'jax': lambda: jax_side.call('time'), 'torch': lambda: torch_side.call('time')},
                                repeats, timed_by_callee=True)
    for side in list(sides):
      if side.process.is_alive() and side.side not in row.get('peak_rss_gib', {}):
        stop(side)
  finally:
    for side in sides:
      side.kill()
    row.setdefault('peak_rss_gib', {})['both'] = watch.close()
  jax_s, torch_s = statistics.median(times['jax']), statistics.median(times['torch'])
  flops = info['flops']
  row.update(jax_s=jax_s, torch_s=torch_s, ratio=torch_s / jax_s, items_per_s_jax=info['items'] / jax_s,
             items_per_s_torch=info['items'] / torch_s, gflops=flops / 1e9, gflops_per_s=flops / jax_s / 1e9)
  log(f'[{name}] jax {jax_s:.3f} s, torch {torch_s:.3f} s (medians of {repeats}); peak RSS GiB '
      + ', '.join(f'{k} {v:.1f}' for k, v in row['peak_rss_gib'].items()))
  return row


# -------------------------------------------------------------------------- shared pieces


SCALES = ('full', 'quick', 'tiny')
# Workloads whose two sides do not fit in 24 GiB together: timed one side after the other by default.
SEQUENTIAL = {('blip_train', 'full'): 'sequential'}


def pick(scale: str, full, quick, tiny):
  """The value for `scale`: 'full' (the issue's sizes), 'quick' (the real widths with 2 layers
  and small batches: minutes on 2 cores) or 'tiny' (1 layer, tiny images: checks the wiring)."""
  return {'full': full, 'quick': quick, 'tiny': tiny}[scale]


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """The model in eval mode with a little noise on every tensor: the libraries' own
  initialisation leaves biases at 0 and norms at 1, so the output check would not see a bias
  that one side drops; 0.02 keeps activations at their usual scale. Tied tensors stay tied."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * 0.02)
  return model.eval()


def split_jit(model: nnx.Module, fn: Callable):
  """`jax.jit(fn(model, *inputs))` as a pure function of the model's state, the project's hot
  path (split once, merge inside jit; closing over the model would bake the weights into the
  program as constants); returns (jitted, state)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, *inputs: fn(nnx.merge(graphdef, state), *inputs)), state


def image_batch(batch: int, size: int, seed: int = 1):
  """Normalised-looking random images: torch NCHW (on PyTorch's device) and the same pixels as
  numpy NHWC."""
  x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
  return x.to(RUN.torch_device), x.permute(0, 2, 3, 1).numpy()


def token_batch(batch: int, length: int, *, first: int, end: int, vocab: tuple[int, int], seed: int = 2):
  """ids [B, T] `first ... end` then padding (0), of random lengths (the first row full), and
  their mask, as numpy int32."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(*vocab, size=(batch, length))
  lengths = rng.integers(length // 2, length + 1, size=batch)
  lengths[0] = length
  ids[:, 0] = first
  ids[np.arange(batch), lengths - 1] = end
  mask = np.arange(length)[None] < lengths[:, None]
  return np.where(mask, ids, 0).astype(np.int32), mask.astype(np.int32)


def blip_hf(cls, scale: str, image_size: int):
  """An HF BLIP model of BLIP's real shapes (ViT-B/16, BERT-base with 12 heads; fewer layers
  below full scale) with random weights, and the blip_jax model converted from it."""
  layers = pick(scale, 12, 2, 1)
  config = transformers.BlipConfig(
      vision_config=dict(image_size=image_size, patch_size=16, num_hidden_layers=layers,
                         layer_norm_eps=1e-6),  # BLIP's ViT eps (HF's default is 1e-5)
      text_config=dict(num_hidden_layers=layers, num_attention_heads=12))
  torch.manual_seed(0)
  hf = randomized(cls(config))
  hf.tie_weights()
  task = {transformers.BlipForImageTextRetrieval: 'retrieval',
          transformers.BlipForConditionalGeneration: 'caption'}[cls]
  model, _, _ = load_torch(hf.state_dict(), task=task, **compute_dtype('vision', 'text'))
  return hf.to(RUN.torch_device), model, layers


def blip_texts(batch: int):
  return token_batch(batch, 35, first=CLS, end=SEP, vocab=(1000, 30000))  # BLIP retrieval: 35 tokens


# -------------------------------------------------------------------------------- workloads


def blip_vit(scale: str) -> Workload:
  batch, size = pick(scale, (8, 384), (2, 224), (2, 32))
  hf, model, layers = blip_hf(transformers.BlipForImageTextRetrieval, scale, size)
  x, x_nhwc = image_batch(batch, size)
  fn, state = split_jit(model, lambda m, images: m.image_embeds(images))
  return Workload(f'ViT-B/16 x{layers} layers, {size}px, batch {batch}', batch, fn, (state, x_nhwc),
                  lambda: hf.vision_model(pixel_values=x).last_hidden_state)


def blip_text_itm(scale: str) -> Workload:
  """Text features (ITC) and ITM logits of `batch` captions against precomputed image states,
  the work of ranking captions for images (retrieval's re-ranking step)."""
  batch, size = pick(scale, (32, 384), (4, 224), (2, 32))
  hf, model, layers = blip_hf(transformers.BlipForImageTextRetrieval, scale, size)
  ids, mask = blip_texts(batch)
  tokens = (size // 16) ** 2 + 1
  image_states = np.random.default_rng(3).standard_normal((batch, tokens, 768)).astype(np.float32)

  def ours(m, image_states, ids, mask):
    return m.text_features(m.text_embeds(ids, mask)), m.itm_logits(image_states, ids, mask)

  t_ids, t_mask, t_states = torch_ids(ids), torch_ids(mask), torch.from_numpy(image_states).to(RUN.torch_device)
  enc_ids = t_ids.clone()
  enc_ids[:, 0] = ENC  # the HF class leaves the multimodal encoder's first token to the caller

  def theirs():
    text = hf.text_encoder(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
    joint = hf.text_encoder(input_ids=enc_ids, attention_mask=t_mask, encoder_hidden_states=t_states).last_hidden_state
    return torch.nn.functional.normalize(hf.text_proj(text[:, 0]), dim=-1), hf.itm_head(joint[:, 0])

  fn, state = split_jit(model, ours)
  return Workload(f'BERT-base x{layers} layers, 35 tokens, {tokens} image tokens, batch {batch}', batch, fn,
                  (state, image_states, ids, mask), theirs)


def _bench_retrieval_loss(model, batch, rng, alpha):
  """Retrieval fine-tuning's ITC + ITM (hard negatives) without the momentum encoders and queues,
  which HF's BLIP does not have: in-batch ITC over `itc_logits` and the project's ITM loss. The
  negatives come with the batch (drawn once outside) so both sides score the same pairs."""
  ids, mask = batch['text_ids'], batch['text_mask']
  image_embeds = model.image_embeds(batch['image'])
  logits = model.itc_logits(model.image_features(image_embeds), model.text_features(model.text_embeds(ids, mask)))
  targets = jnp.eye(logits.shape[0])
  itc = (objectives.soft_cross_entropy(logits, targets) + objectives.soft_cross_entropy(logits.T, targets)) / 2
  itm, _ = objectives.itm_loss_with_negatives(model.itm_logits, image_embeds, ids, mask, batch['neg_image'],
                                              batch['neg_text'])
  return itc + itm, {'itc': itc, 'itm': itm}


class TorchRetrievalStep:
  """The same step over HF's modules: forward, ITC + ITM loss, backward, AdamW. The temperature
  (not in HF's class) is a parameter as in BLIP, clamped to [0.001, 0.5] when used and after
  each step."""

  def __init__(self, hf, lr: float, weight_decay: float):
    self.hf = hf
    self.temp = torch.nn.Parameter(torch.tensor(0.07, device=RUN.torch_device))
    self.opt = torch.optim.AdamW([*hf.parameters(), self.temp], lr=lr, weight_decay=weight_decay)

  def __call__(self, images, ids, mask, neg_image, neg_text):
    hf, b = self.hf, ids.shape[0]
    image_embeds = hf.vision_model(pixel_values=images).last_hidden_state
    image_feat = torch.nn.functional.normalize(hf.vision_proj(image_embeds[:, 0]), dim=-1)
    text = hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    text_feat = torch.nn.functional.normalize(hf.text_proj(text[:, 0]), dim=-1)
    logits = image_feat @ text_feat.T / self.temp.clamp(0.001, 0.5)
    targets = torch.arange(b, device=ids.device)
    itc = (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    enc_ids = ids.clone()
    enc_ids[:, 0] = ENC
    joint = hf.text_encoder(input_ids=torch.cat([enc_ids, enc_ids, enc_ids[neg_text]]),
                            attention_mask=torch.cat([mask, mask, mask[neg_text]]),
                            encoder_hidden_states=torch.cat([image_embeds, image_embeds[neg_image], image_embeds]),
                            ).last_hidden_state
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(ids.device)
    itm = torch.nn.functional.cross_entropy(hf.itm_head(joint[:, 0]), labels)
    loss = itc + itm
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      self.temp.clamp_(0.001, 0.5)
    return loss.detach()


def blip_train(scale: str) -> Workload:
  """One retrieval fine-tuning step through the project's `Trainer` (its jitted, donated step)."""
  batch, size = pick(scale, (8, 384), (2, 224), (2, 32))
  lr, weight_decay = 1e-5, 0.05  # BLIP's COCO retrieval fine-tuning
  hf, model, layers = blip_hf(transformers.BlipForImageTextRetrieval, scale, size)
  x, x_nhwc = image_batch(batch, size)
  ids, mask = blip_texts(batch)
  rng = np.random.default_rng(4)  # a negative is never the positive: shift by 1..B-1
  neg_image = ((np.arange(batch) + rng.integers(1, batch, batch)) % batch).astype(np.int32)
  neg_text = ((np.arange(batch) + rng.integers(1, batch, batch)) % batch).astype(np.int32)
  # Dropout is off on both sides, so that the outputs are comparable: HF's model is in eval mode,
  # and the project's step (which trains with dropout on) gets a config with rate 0.
  task = train_tasks.Task('bench_retrieval', 'blip', 'retrieval', 'pairs', _bench_retrieval_loss)
  no_dropout = dataclasses.replace(model.config, text=dataclasses.replace(model.config.text, hidden_dropout=0.0,
                                                                           attention_dropout=0.0))
  # Weight decay on every parameter on both sides: the project's no-decay list matches its own
  # parameter names, which differ from HF's.
  trainer = train_state.Trainer(task, lambda: blip_models.build('retrieval', no_dropout),
                                optax.adamw(lr, weight_decay=weight_decay), train_state.make_mesh())
  state = trainer.with_model(trainer.init(), model)
  data = {'image': x_nhwc, 'text_ids': ids, 'text_mask': mask, 'neg_image': neg_image, 'neg_text': neg_text}
  step = TorchRetrievalStep(hf, lr, weight_decay)
  t_args = (x, *map(torch_ids, (ids, mask, neg_image, neg_text)))

  def params(model):
    """Every parameter but `temp` (HF has none), in the order of the model's tree."""
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
            if 'temp' not in jax.tree_util.keystr(path)]

  def jax_result(out):
    """The loss of the first step and every parameter after it."""
    new_state, metrics = out
    return as_numpy((metrics['loss'], params(trainer.model(new_state))))

  def torch_result(loss):
    """The same from HF's side: its weights after the step converted again."""
    return as_numpy((loss, params(load_torch(hf.state_dict(), task='retrieval')[0])))

  return Workload(f'ITC+ITM step, ViT-B/16 x{layers} + BERT x{layers}, {size}px, batch {batch}', batch,
                  trainer.step_fn, (state, data), lambda: step(*t_args), jax_result=jax_result,
                  torch_result=torch_result, carry=lambda out, args: (out[0], args[1]), grad=True)


def decode_step_flops(model, decoder_of, condition, images, prompt_rows: int, max_length: int) -> float:
  """FLOPs of one decoding step (one token for each of `prompt_rows` sequences against the full
  cache), from the cost analysis of that step compiled alone."""
  graphdef, state = nnx.split(model)

  def states(state, images):
    return condition(nnx.merge(graphdef, state), images)

  spec = jax.eval_shape(states, state, images)
  spec = jax.ShapeDtypeStruct((prompt_rows, *spec.shape[1:]), spec.dtype)  # beams repeat the rows
  cache = jax.eval_shape(lambda state, s: decoder_of(nnx.merge(graphdef, state)).init_cache(prompt_rows, max_length, s),
                         state, spec)
  slots = jnp.ones((prompt_rows, max_length), jnp.int32)
  step = jax.jit(lambda state, ids, cache: decoder_of(nnx.merge(graphdef, state)).decode(ids, slots, cache))
  return cost_flops(step.lower(state, jax.ShapeDtypeStruct((prompt_rows, 1), jnp.int32), cache).compile())


def decoding(model, decoder_of, condition, search, x_nhwc, prompt, *, rows: int, max_length: int,
             torch_fn, size: str) -> Workload:
  """Image -> tokens under one jit: `search(decoder, condition(model, images), prompt)`. The
  minimum length equals the maximum, so every sequence runs all steps on both sides."""
  fn, state = split_jit(model, lambda m, images, prompt: search(decoder_of(m), condition(m, images), prompt))
  # The prompt's call gives the first token; the while loop decodes each later one, one call an
  # iteration (none after the last token), and XLA's cost analysis counts its body once.
  iterations = max_length - prompt.shape[1] - 1
  extra = lambda: max(iterations - 1, 0) * decode_step_flops(model, decoder_of, condition, x_nhwc, rows, max_length)
  return Workload(size, prompt.shape[0], fn, (state, x_nhwc, prompt), torch_fn, extra_flops=extra)


def blip_caption(scale: str) -> Workload:
  """Beam search (3 beams) for 20 tokens after BLIP's prompt 'a picture of'."""
  batch, size = pick(scale, (4, 384), (2, 224), (2, 32))
  beams, new = 3, 20
  hf, model, layers = blip_hf(transformers.BlipForConditionalGeneration, scale, size)
  x, x_nhwc = image_batch(batch, size)
  words = [1037, 3861, 1997]  # a picture of
  prompt = np.asarray([[DEC, *words]] * batch, np.int32)
  max_length = prompt.shape[1] + new
  search = functools.partial(generate.beam_search, num_beams=beams, max_length=max_length, min_length=max_length,
                             eos_token_id=SEP, pad_token_id=0)
  # HF swaps in [DEC] and drops the last token
  hf_ids = torch.tensor([[CLS, *words, SEP]] * batch, device=RUN.torch_device)

  def theirs():
    return hf.generate(pixel_values=x, input_ids=hf_ids, num_beams=beams, do_sample=False, max_length=max_length,
                       min_length=max_length, length_penalty=1.0)

  return decoding(model, lambda m: m.text_decoder, lambda m, images: m.image_embeds(images),
                  lambda *a: search(*a)[0][:, 0], x_nhwc, prompt, rows=batch * beams, max_length=max_length,
                  torch_fn=theirs, size=f'ViT-B/16 x{layers} + decoder x{layers}, {size}px, '
                                        f'{beams} beams x {new} tokens, batch {batch}')


def blip2_hf(cls, scale: str, **config):
  """An HF BLIP-2 model with the real Q-Former (BERT-base, 32 queries, cross-attention every 2nd
  layer) reading ViT-g-wide image states. The ViT-g itself (1B parameters) is cut to one layer:
  the Q-Former workload skips it and the captioning one counts it once per caption."""
  layers = pick(scale, 12, 2, 1)
  hf_config = transformers.Blip2Config(
      vision_config=dict(num_hidden_layers=1, layer_norm_eps=1e-6, image_size=pick(scale, 224, 224, 28)),
      qformer_config=dict(num_hidden_layers=layers, use_qformer_text_input=cls is transformers.Blip2ForImageTextRetrieval),
      **config)
  torch.manual_seed(0)
  hf = randomized(cls(hf_config))
  with torch.no_grad():  # EVA has no key bias: the middle third of HF's fused qkv bias stays 0
    for layer in hf.vision_model.encoder.layers:
      width = layer.self_attn.qkv.bias.shape[0] // 3
      layer.self_attn.qkv.bias[width:2 * width] = 0
  hf.tie_weights()
  towers = ('qformer', 'opt') if cls is transformers.Blip2ForConditionalGeneration else ('qformer',)
  model, _, _ = load_torch(hf.state_dict(), task='blip2', ln_vision_eps=1e-6,
                           **compute_dtype(*towers, vision={'ln_eps': 1e-6}))
  return hf.to(RUN.torch_device), model, layers


def blip2_qformer(scale: str) -> Workload:
  """ITC image features [B, 32, 256] from precomputed ViT-g states (ln_vision applied)."""
  batch = pick(scale, 32, 4, 2)
  hf, model, layers = blip2_hf(transformers.Blip2ForImageTextRetrieval, scale)
  states = np.random.default_rng(5).standard_normal((batch, 257, 1408)).astype(np.float32)
  t_states = torch.from_numpy(states).to(RUN.torch_device)

  def theirs():
    queries = hf.qformer(query_embeds=hf.query_tokens.expand(batch, -1, -1), encoder_hidden_states=t_states)
    return torch.nn.functional.normalize(hf.vision_projection(queries.last_hidden_state), dim=-1)

  fn, state = split_jit(model, lambda m, s: m.image_features(s))
  return Workload(f'Q-Former x{layers} layers, 32 queries, 257x1408 image states, batch {batch}', batch, fn,
                  (state, states), theirs)


def blip2_opt(scale: str) -> Workload:
  """Greedy captioning with an OPT-125m-sized LLM: one-layer ViT-g, Q-Former, 20 tokens."""
  batch, new = pick(scale, 4, 2, 2), 20
  opt_layers = pick(scale, 12, 2, 1)
  image_token = 50265  # the `<image>` placeholder HF's BLIP-2 processor adds after OPT's vocabulary
  hf, model, layers = blip2_hf(transformers.Blip2ForConditionalGeneration, scale, image_token_index=image_token,
                               text_config=dict(model_type='opt', num_hidden_layers=opt_layers))
  queries = hf.config.num_query_tokens
  size = hf.config.vision_config.image_size
  x, x_nhwc = image_batch(batch, size)
  bos, pad = 2, 1  # OPT's `</s>` starts and ends a text
  prompt = np.full((batch, 1), bos, np.int32)
  max_length = 1 + new
  search = functools.partial(generate.greedy, max_length=max_length, min_length=max_length, eos_token_id=bos,
                             pad_token_id=pad)
  hf_ids = torch.tensor([[image_token] * queries + [bos]] * batch, device=RUN.torch_device)

  def theirs():  # HF counts the query placeholders in the lengths
    return hf.generate(pixel_values=x, input_ids=hf_ids, num_beams=1, do_sample=False,
                       max_length=queries + max_length, min_length=queries + max_length)[:, queries:]

  return decoding(model, lambda m: m.decoder, lambda m, images: m.prefix(m.image_embeds(images)), search, x_nhwc,
                  prompt, rows=batch, max_length=max_length, torch_fn=theirs,
                  size=f'ViT-g x1 + Q-Former x{layers} + OPT-125m x{opt_layers}, {size}px, greedy {new} tokens, '
                       f'batch {batch}')


def clip(scale: str) -> Workload:
  """open_clip ViT-B-16 (GELU): image features of `batch` images and text features of `batch`
  77-token texts."""
  open_clip = torch_refs.import_open_clip()  # without torchvision (see there)
  batch, size = pick(scale, (16, 224), (2, 224), (2, 32))
  layers = pick(scale, 12, 2, 1)
  name = 'ViT-B-16'
  if scale != 'full':  # ViT-B-16's widths with fewer layers, registered as open_clip's own configs are
    folder = tempfile.mkdtemp(prefix='blip_jax_bench_')
    cfg = dict(embed_dim=512, vision_cfg=dict(image_size=size, layers=layers, width=768, patch_size=16),
               text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=layers))
    name = f'blip-jax-bench-ViT-B-16-{scale}'
    with open(os.path.join(folder, name + '.json'), 'w') as f:
      json.dump(cfg, f)
    open_clip.add_model_config(folder)
  torch.manual_seed(0)
  ref = randomized(open_clip.create_model(name, pretrained=None))
  # open_clip's non-quickgelu configs use GELU
  model, _, _ = load_torch(ref.state_dict(), act='gelu', **compute_dtype('vision', 'text'))
  ref.to(RUN.torch_device)
  x, x_nhwc = image_batch(batch, size)
  ids, _ = token_batch(batch, 77, first=49406, end=49407, vocab=(1, 49406))  # EOT = largest id
  t_ids = torch_ids(ids)
  fn, state = split_jit(model, lambda m, images, ids: (m.encode_image(images), m.encode_text(ids)))
  return Workload(f'ViT-B/16 x{layers} + text x{layers}, {size}px, 77 tokens, batch {batch}', batch, fn,
                  (state, x_nhwc, ids), lambda: (ref.encode_image(x), ref.encode_text(t_ids)))


WORKLOADS = {'blip_vit': blip_vit, 'blip_text_itm': blip_text_itm, 'blip_train': blip_train,
             'blip_caption': blip_caption, 'blip2_qformer': blip2_qformer, 'blip2_opt': blip2_opt, 'clip': clip}


# ------------------------------------------------------------------------------------ report


def nominal_peak_tflops(given: float | None) -> float | None:
  """The accelerator's datasheet peak for MFU: `given`, else, in bf16 on a known GPU, its dense
  bf16 peak; None otherwise (a CPU has no datasheet figure to trust: `of peak` is measured)."""
  if given or RUN.dtype != 'bfloat16' or jax.default_backend() == 'cpu':
    return given
  kind = jax.devices()[0].device_kind
  return next((tflops for name, tflops in NOMINAL_BF16_TFLOPS if name in kind), None)


def machine_info(scale: str, repeats: int, peaks: dict[str, float], nominal_tflops: float | None) -> dict:
  cpu = platform.processor()
  with contextlib.suppress(OSError):
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  versions = {}
  for package in ('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'open_clip_torch'):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      versions[package] = importlib.metadata.version(package)
  return {'cpu': cpu, 'cores': CORES, 'torch_threads': torch.get_num_threads(), 'jax_backend': jax.default_backend(),
          'jax_device': jax.devices()[0].device_kind, 'torch_device': str(RUN.torch_device),
          'versions': versions, 'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
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
             ('rss', 'peak RSS GiB jax/torch/both', '{}')]
  cells = [[title for _, title, _ in columns]]
  for row in rows:
    rss = row.get('peak_rss_gib', {})
    row = {**row, 'rss': '/'.join(f'{rss[k]:.1f}' if k in rss else '-' for k in ('jax', 'torch', 'both'))}
    cells.append([fmt.format(row[key]) if row.get(key) is not None else '-' for key, _, fmt in columns])
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = ['  '.join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
  lines.insert(1, '-' * len(lines[0]))
  lines += [f'{row["workload"]}: {row["error"]}' for row in rows if 'error' in row]
  return '\n'.join(lines)


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
