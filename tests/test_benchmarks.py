"""The benchmark's two sides compute the same thing: every workload of `benchmarks/run.py`, at
its tiny scale (real widths, 1 layer, tiny images), gives the same outputs in blip_jax and in its
PyTorch reference on the same random weights, so the timings it reports compare like for like.
This covers the PyTorch code the benchmark writes itself (the retrieval train step, the direct
module calls, the `generate` arguments), which no other test runs. In bf16 (`--dtype bfloat16`)
both sides must really compute in bf16 and still agree to bf16 precision."""

import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import run  # noqa: E402


def outputs(name: str, dtype: str):
  """The tiny workload's first JAX and PyTorch outputs (numpy leaves) with both sides in `dtype`."""
  run.configure(dtype, 'cpu')
  try:
    return run.first_outputs(run.WORKLOADS[name]('tiny'))
  finally:
    run.configure('float32', 'cpu')


@pytest.mark.parametrize('name', list(run.WORKLOADS))
def test_jax_and_torch_outputs_agree(name):
  diff = run.differences(*outputs(name, 'float32'))
  assert run.mismatch(diff, 'float32') is None, diff


# The workloads whose outputs are floating (decoding's tokens may part at a bf16 near-tie).
@pytest.mark.parametrize('name', ['blip_vit', 'blip_text_itm', 'blip_train', 'blip2_qformer', 'clip'])
def test_bf16_sides_compute_in_bf16_and_agree_to_its_precision(name):
  jax32, torch32 = outputs(name, 'float32')
  jax16, torch16 = outputs(name, 'bfloat16')
  diff = run.differences(jax16, torch16)
  assert run.mismatch(diff, 'bfloat16') is None, diff
  # Each side's bf16 output is not its fp32 one: bf16 really took effect on both.
  assert run.differences(jax16, jax32)['max_rel_diff'] > 1e-4  # fp32 differences are ~1e-6
  assert run.differences(torch16, torch32)['max_rel_diff'] > 1e-4


def test_differences_separate_floating_outputs_from_tokens():
  ours = [np.array([1.0, 2.0], np.float32), np.array([[5, 6, 7]], np.int32)]
  theirs = [torch.tensor([1.0, 2.5]), torch.tensor([[5, 6, 8]])]
  diff = run.differences(ours, theirs)
  assert diff == pytest.approx({'max_abs_diff': 0.5, 'max_rel_diff': 0.2, 'token_agreement': 2 / 3})
  assert run.mismatch(diff, 'float32').startswith('outputs differ')
  assert run.mismatch(diff, 'bfloat16').startswith('outputs differ')  # 20% > BF16_TOL
  assert run.mismatch({'token_agreement': 2 / 3}, 'float32').startswith('generated tokens differ')
  # bf16: 0.5 apart is within 4% of a large output, and tokens are only reported.
  assert run.mismatch({'max_abs_diff': 0.5, 'max_rel_diff': 0.04, 'token_agreement': 2 / 3}, 'bfloat16') is None
  with pytest.raises(ValueError, match='shapes differ'):
    run.differences(ours[:1], [torch.zeros(3)])
