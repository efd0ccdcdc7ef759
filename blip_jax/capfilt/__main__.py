import sys

from blip_jax.capfilt.run import main

sys.exit(main())
