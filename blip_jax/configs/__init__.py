"""Training recipes, one module per objective and dataset, each with `get_config(arg)` (ml_collections)
and a docstring that gives the command and the expected result; `get_config('tiny')` is the
few-step version the tests run. `train.py --config configs/NAME.py[:arg]` (the top-level
`configs/` re-exports these) or `blip-jax-train --config NAME[:arg]`.
"""
