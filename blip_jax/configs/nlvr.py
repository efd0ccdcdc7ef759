"""BLIP NLVR2 fine-tuning: two images, one statement, true / false (cross-entropy).

    python train.py --config configs/nlvr.py --workdir runs/nlvr \\
        --config.init_from=weights/blip_base --config.data.vocab=/path/to/bert-base-uncased \\
        --config.data.annotations.train=nlvr_train.json --config.data.annotations.validation=nlvr_dev.json \\
        --config.data.image_root=/data/nlvr2

`:tiny` is the few-step test version. Expected (ViT-B, 15 epochs at 384 px, batch 128): test
accuracy about 83.
"""

from blip_jax import evaluate
from blip_jax.models import blip
from blip_jax.train.config_base import base, make_tiny, model_fields, tiny_blip


def get_config(arg: str = ''):
  c = base()
  c.objective = 'nlvr'
  c.model = model_fields(blip.blip_config('base', 384))
  c.data.update(name='blip_annotations', task='nlvr', text_length=35)
  c.batch_size = 128
  c.num_epochs = 15
  c.optim.update(schedule='cosine', lr=3e-5, weight_decay=0.05)
  c.evals.nlvr = evaluate.settings('nlvr')
  if arg == 'tiny':
    make_tiny(c, tiny_blip())
    c.optim.lr = 1e-3
  elif arg:
    raise ValueError(f"configs/nlvr.py takes no argument or 'tiny', got {arg!r}")
  return c
