"""BLIP VQA fine-tuning: the answer decoder trained on the question encoder's states, each
answer weighted by its VQA soft score; evaluated by ranking the training answers.

    python train.py --config configs/vqa.py --workdir runs/vqa \\
        --config.init_from=weights/blip_base --config.data.vocab=/path/to/bert-base-uncased \\
        --config.data.annotations.train=vqa_train.json --config.data.annotations.validation=vqa_val.json \\
        --config.data.image_root=/data/coco

`:tiny` is the few-step test version. Expected (ViT-B, 10 epochs at 480 px, VQAv2 + VG,
batch 128): test-dev accuracy about 78.2.
"""

from blip_jax import evaluate
from blip_jax.models import blip
from blip_jax.train.config_base import base, make_tiny, model_fields, tiny_blip


def get_config(arg: str = ''):
  c = base()
  c.objective = 'vqa'
  c.model = model_fields(blip.blip_config('base', 480))
  c.data.update(name='blip_annotations', task='vqa', text_length=35, answer_length=10, num_answers=10)
  c.batch_size = 128
  c.num_epochs = 10
  c.optim.update(schedule='cosine', lr=2e-5, weight_decay=0.05)
  c.evals.vqa = evaluate.settings('vqa')
  if arg == 'tiny':
    make_tiny(c, tiny_blip())
    c.data.num_answers = 2
    c.optim.lr = 1e-3
  elif arg:
    raise ValueError(f"configs/vqa.py takes no argument or 'tiny', got {arg!r}")
  return c
