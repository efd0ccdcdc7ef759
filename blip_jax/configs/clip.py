"""CLIP contrastive training (symmetric InfoNCE over the global batch, learnable logit scale
clamped at 100) of a small CLIP on `synthetic_scenes/small`, or any caption data.

    python train.py --config configs/clip.py --workdir runs/clip

Fine-tuning converted OpenAI / open_clip weights: `--config.init_from=DIR` (its architecture is
read from DIR) with `--config.optim.lr=1e-5`. `:tiny` is the few-step test version.
Evaluation: ITC retrieval R@1/5/10 on the validation split, and zero-shot classification of
the validation scenes by their number of objects (1, 2 or 3; chance is 33%). For ImageNet:
`--config.eval.zero_shot.dataset=imagenet2012 --config.eval.zero_shot.templates=...`.
"""

from blip_jax import evaluate
from blip_jax.models import clip
from blip_jax.train.config_base import base, make_tiny, model_fields, tiny_clip


def get_config(arg: str = ''):
  c = base()
  c.objective = 'clip'
  c.model = model_fields(clip.clip_config(
      'ViT-B/16', vision=dict(image_size=64, width=128, depth=4, num_heads=4, mlp_dim=512, patch_size=16),
      text=dict(width=128, num_layers=4, num_heads=4, context_length=24), embed_dim=64))
  c.data.update(name='synthetic_scenes/small', text_length=24, flip=False)  # captions say left / right
  c.batch_size = 64
  c.num_epochs = 4
  c.optim.update(schedule='warmup_cosine', lr=5e-4, warmup_steps=100, weight_decay=0.1)
  c.evals.retrieval = evaluate.settings('retrieval', k_test=0)  # ITC only: CLIP has no ITM head
  c.evals.zero_shot = evaluate.settings(
      'zero_shot', dataset=c.data.name, label_key='num_objects', first_label=1,
      class_names=('one shape', 'two shapes', 'three shapes'), templates=('an image showing {}', 'a picture of {}'))
  if arg == 'tiny':
    make_tiny(c, tiny_clip())
    c.evals.zero_shot.dataset = c.data.name
  elif arg:
    raise ValueError(f"configs/clip.py takes no argument or 'tiny', got {arg!r}")
  return c
