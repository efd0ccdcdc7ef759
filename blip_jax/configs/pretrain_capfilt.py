"""BLIP pretraining on a CapFilt-bootstrapped dataset: the default recipe (configs/default.py: the
same small model, losses and 1100 steps of 32) on the kept web texts and synthetic captions of
`python -m blip_jax.capfilt`, so the run compares with the default run on the original captions.

The whole loop on synthetic_scenes/small (on 2 CPU cores step 1 takes 9 minutes, step 2 one minute
(2026-11-25: 5841 of 10000 web texts and 3851 of 6000 synthetic captions kept, precision 0.60 /
recall 0.83 on the replaced texts), step 3 the same 1100 steps as step 1):

    python train.py                                        # 1. pretrain: runs/default/model
    python -m blip_jax.capfilt --captioner runs/default/model --filter runs/default/model \\
        --data synthetic_scenes/small --out runs/capfilt --copy-split validation \\
        --corrupt-fraction 0.3                             # 2. caption, filter (web text 30% noisy)
    python train.py --config configs/pretrain_capfilt.py --workdir runs/pretrain_capfilt   # 3.

Step 2 writes runs/capfilt/annotations.json (the kept pairs), validation.json (the validation
split, unfiltered, for the evaluation), images/ and vocab.txt; this config reads them from
`runs/capfilt`, or from the folder given as argument: `configs/pretrain_capfilt.py:DIR`. The dataset
is built under DIR/tfds (capfilt removes it when it writes a different output). A released BLIP
captioner and filter (converted, `convert_torch_weights.py`) work the same way on your own web
pairs (`--data pairs.json --image-root /data/images`); then start from `configs/pretrain.py`'s
recipe instead.

`:tiny` (or `:tiny,DIR`, default DIR runs/capfilt_tiny) is the few-step test version.
"""

import os

from blip_jax.configs import default


def get_config(arg: str = ''):
  parts = [p for p in arg.split(',') if p]
  tiny = 'tiny' in parts
  dirs = [p for p in parts if p != 'tiny']
  if len(dirs) > 1:
    raise ValueError(f"configs/pretrain_capfilt.py takes 'tiny' and / or one capfilt output folder, got {arg!r}")
  out = dirs[0] if dirs else ('runs/capfilt_tiny' if tiny else 'runs/capfilt')
  c = default.get_config('tiny' if tiny else '')
  c.data.update(name='blip_annotations', task='caption', config_name='capfilt', data_dir=os.path.join(out, 'tfds'),
                image_root=os.path.join(out, 'images'), vocab=os.path.join(out, 'vocab.txt'))
  c.data.annotations.update(train=os.path.join(out, 'annotations.json'),
                            validation=os.path.join(out, 'validation.json'), test='')
  return c
