"""Side-by-side timing of blip_jax against the PyTorch references: `python benchmarks/run.py`."""
