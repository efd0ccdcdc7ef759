"""Convert PyTorch checkpoints into blip_jax model directories; see `--help` and the README."""

import sys

from blip_jax.convert_cli import main

if __name__ == '__main__':
  sys.exit(main())
