"""The benchmark's two sides compute the same thing: every workload of `benchmarks/run.py`, at
its tiny scale (real widths, 1 layer, tiny images), gives the same outputs in blip_jax and in its
PyTorch reference on the same random weights, so the timings it reports compare like for like.
This covers the PyTorch code the benchmark writes itself (the retrieval train step, the direct
module calls, the `generate` arguments), which no other test runs."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import run  # noqa: E402


@pytest.mark.parametrize('name', list(run.WORKLOADS))
def test_jax_and_torch_outputs_agree(name):
  w = run.WORKLOADS[name]('tiny')
  run_jax, run_torch, _ = run.runners(w)
  assert run.first_diff(w, run_jax, run_torch) <= run.TOL
