"""Train (or evaluate) a BLIP / BLIP-2 / CLIP model: `python train.py [--config configs/X.py[:arg]]
[--workdir DIR] [--config.field=value ...]`. With no flags: configs/default.py into runs/default.
The same as the `blip-jax-train` command (`blip_jax/train/cli.py`); see the README.
"""

from blip_jax.train.cli import main

if __name__ == '__main__':
  main()
