"""BLIP-2 stage 2: the Q-Former's queries become a soft prompt of a frozen OPT (LM loss on the
text); the image encoder and OPT never train.

    python convert_torch_weights.py blip2_pretrained_opt2.7b.pth eva_vit_g.pth path/to/hf/opt-2.7b \\
        --out weights/blip2_opt2.7b
    python train.py --config configs/blip2_stage2.py --workdir runs/blip2_opt \\
        --config.init_from=weights/blip2_opt2.7b ...   # data as in blip2_stage1.py

The frozen EVA ViT-g and OPT come with `init_from` (LAVIS stage-2 checkpoints leave them out, so
the converter takes them as further sources). Recipe (LAVIS): OPT-2.7b, lr 1e-4 warmup 2000, cosine to
1e-5, 10 epochs, batch 1536. `:tiny` is the test version, which reports the validation LM loss.
"""

from blip_jax import evaluate
from blip_jax.models import blip2, opt, qformer, vit
from blip_jax.train.config_base import base, make_tiny, model_fields, tiny_blip2


def get_config(arg: str = ''):
  c = base()
  c.objective = 'blip2_stage2'
  c.model = model_fields(blip2.Blip2Config(
      vision=vit.vit_config('eva_g', image_size=224), qformer=qformer.QFormerConfig(text_input=False),
      embed_dim=256, opt=opt.opt_config('2.7b')))
  c.data.update(name='blip_annotations', task='caption', text_length=32)
  c.batch_size = 1536
  c.num_epochs = 10
  c.optim.update(schedule='warmup_cosine', lr=1e-4, warmup_steps=2000, warmup_lr=1e-6, min_lr=1e-5,
                 weight_decay=0.05)
  c.checkpoint_every_steps = 5000
  c.evals.lm = evaluate.settings('lm')
  if arg == 'tiny':
    make_tiny(c, tiny_blip2(stage2=True))
    c.optim.lr = 1e-3
  elif arg:
    raise ValueError(f"configs/blip2_stage2.py takes no argument or 'tiny', got {arg!r}")
  return c
