"""The training-curve PNG's layout: every loss term and optimiser value on its own axis."""

from blip_jax.train.logs import MetricWriter, curve_panels


def test_each_loss_term_and_the_lr_have_their_own_panel_and_evaluators_share_one():
  names = ['train/itm', 'train/loss', 'train/itc', 'opt/grad_norm', 'opt/lr', 'speed/examples_per_s',
           'retrieval/i2t_r1', 'retrieval/t2i_r1', 'caption/cider', 'caption/bleu4', 'opt/alpha']
  panels = curve_panels(names)
  assert list(panels) == ['train/loss', 'train/itc', 'train/itm', 'opt/lr', 'opt/alpha', 'opt/grad_norm', 'caption',
                          'retrieval', 'speed']
  assert panels['retrieval'] == ['retrieval/i2t_r1', 'retrieval/t2i_r1'] and panels['opt/lr'] == ['opt/lr']
  assert sorted(n for group in panels.values() for n in group) == sorted(names)  # each series drawn once


def test_the_png_is_written_from_metrics_jsonl(tmp_path):
  writer = MetricWriter(str(tmp_path))
  for step in range(1, 31):
    writer.write(step, {'train/loss': 1.0 / step, 'opt/lr': 1e-3})
    if step % 10 == 0:
      writer.write(step, {'retrieval/i2t_r1': float(step)})
  out = writer.plot()
  assert out == str(tmp_path / 'training_curves.png') and (tmp_path / 'training_curves.png').stat().st_size > 10_000
