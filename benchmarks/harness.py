"""Running one workload: both sides in processes of their own, their outputs compared, then
timed (alternately, or one side after the other), with FLOPs from XLA and peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import multiprocessing
import resource
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.settings import BF16_TOL, RUN, TOL, configure, log, torch_autocast, torch_sync
from blip_jax.convert.readers import to_numpy
from blip_jax.models import layers


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
  torch_attention: str = ''  # the PyTorch side's attention implementation (HF's `attn_implementation`)


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
    from benchmarks.workloads import WORKLOADS  # the side process builds the workload
    w = WORKLOADS[name](scale)
    if side == 'jax':
      w.torch_fn = w.torch_result = None
      _release_memory()
      start = time.perf_counter()
      layers.PATHS_USED.clear()
      run, flops = jax_runner(w)
      result = w.jax_result or as_numpy
      conn.send(('ready', {'flops': flops, 'compile_s': time.perf_counter() - start, 'size': w.size,
                           'items': w.items, 'attention': '+'.join(sorted(layers.PATHS_USED)) or '-'}))
    else:
      w.jax_fn = w.jax_args = w.jax_result = w.carry = w.extra_flops = None
      _release_memory()
      run, result = torch_runner(w), w.torch_result or as_numpy
      conn.send(('ready', {'attention': w.torch_attention or '-'}))
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
      raise RuntimeError(f'the {self.side} side died (exit code {self.process.exitcode}; killed for memory?)') from None
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
        with contextlib.suppress(OSError, ValueError), open(f'/proc/{pid}/status') as f:
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
    row['attention'] = {'jax': info['attention'], 'torch': torch_side.info['attention']}
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
