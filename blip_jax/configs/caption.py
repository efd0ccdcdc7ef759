"""BLIP caption fine-tuning on COCO: LM loss with label smoothing 0.1, the prompt 'a picture of '
ignored by the loss; evaluated with generated captions (BLEU, ROUGE-L, CIDEr and, where Java
is installed, METEOR).

    python train.py --config configs/caption.py --workdir runs/caption_coco \\
        --config.init_from=weights/blip_base --config.data.vocab=/path/to/bert-base-uncased \\
        --config.data.annotations.train=coco_karpathy_train.json \\
        --config.data.annotations.validation=coco_karpathy_val.json --config.data.image_root=/data/coco

`:tiny` is the few-step test version. Expected (ViT-B, 5 epochs at 384 px, batch 256):
BLEU-4 about 39.9, CIDEr about 133.5 on the Karpathy test split with beam search (3 beams,
max 20 / min 5 tokens, as evaluated here).
"""

from blip_jax import evaluate
from blip_jax.models import blip
from blip_jax.train.config_base import base, make_tiny, model_fields, tiny_blip


def get_config(arg: str = ''):
  c = base()
  c.objective = 'caption'
  c.model = model_fields(blip.blip_config('base', 384))  # captions continue its prompt 'a picture of '
  c.data.update(name='blip_annotations', task='caption', text_length=40)
  c.batch_size = 256
  c.num_epochs = 5
  c.optim.update(schedule='cosine', lr=1e-5, weight_decay=0.05)
  c.evals.caption = evaluate.settings('caption', max_length=20, min_length=5, num_beams=3, meteor=True)
  if arg == 'tiny':
    make_tiny(c, tiny_blip())
    c.optim.lr = 1e-3
  elif arg:
    raise ValueError(f"configs/caption.py takes no argument or 'tiny', got {arg!r}")
  return c
