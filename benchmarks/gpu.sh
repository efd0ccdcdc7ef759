#!/usr/bin/env bash
# The GPU benchmark, one prepared run (docs/performance.md "On a GPU"): bf16 on both sides with
# PyTorch on CUDA, then the fp32 table, raw JSON under benchmarks/results/. Needs jax with CUDA,
# torch with CUDA, transformers, flax, optax, orbax (no TensorFlow); open_clip_torch (--no-deps)
# for the CLIP row.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
stamp=$(date -u +%Y-%m-%d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python benchmarks/run.py --dtype bfloat16 --torch-device cuda --repeats 10 --out "$out/$stamp-gpu-bf16.json"
python benchmarks/run.py --dtype float32 --torch-device cuda --repeats 5 --out "$out/$stamp-gpu-fp32.json"
