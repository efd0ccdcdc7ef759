"""BLIP pretraining (ITC + ITM + LM with the tied decoder) on your image-text pairs, the
originals' recipe: warmup over the first 3000 steps from 1e-6 (in epoch 0 only, as BLIP's pretrain.py),
then lr * 0.9 ** epoch; 20 epochs at 224 px.

    python train.py --config configs/pretrain.py --workdir runs/pretrain \\
        --config.data.vocab=/path/to/bert-base-uncased \\
        --config.data.annotations.train=pretrain_pairs.json \\
        --config.data.annotations.validation=coco_karpathy_val.json --config.data.image_root=/data/images

Arguments: `base` (ViT-B, lr 3e-4, batch 600) or `large` (ViT-L, lr 2e-4, batch 320);
`tiny` = the few-step test version. The published BLIP ViT-B 14M model reaches COCO TR@1 about
80.6 after retrieval fine-tuning; zero-shot numbers depend on your data.
"""

import dataclasses

from blip_jax import evaluate
from blip_jax.models import blip
from blip_jax.train.config_base import base, make_tiny, model_fields, tiny_blip


def get_config(arg: str = 'base'):
  if arg not in ('base', 'large', 'tiny'):
    raise ValueError(f"configs/pretrain.py takes 'base', 'large' or 'tiny', got {arg!r}")
  c = base()
  c.objective = 'pretrain'
  large = arg == 'large'
  # Pretraining's LM learns captions without a prompt.
  c.model = model_fields(blip.blip_config('large' if large else 'base', 224, embed_dim=256, queue_size=57600,
                                          momentum=0.995, prompt=''))
  c.data.update(name='blip_annotations', task='caption', text_length=30)
  c.batch_size = 320 if large else 600
  c.num_epochs = 20
  c.alpha, c.alpha_ramp_epochs = 0.4, 2
  c.optim.update(schedule='step', lr=2e-4 if large else 3e-4, warmup_steps=3000, warmup_lr=1e-6,
                 decay_rate=0.9, min_lr=1e-6, weight_decay=0.05)
  c.checkpoint_every_steps = 5000
  c.evals.retrieval = evaluate.settings('retrieval', k_test=256)
  c.evals.caption = evaluate.settings('caption')
  if arg == 'tiny':
    make_tiny(c, dataclasses.replace(tiny_blip(), prompt=''))
    c.optim.lr = 1e-3
  return c
