"""What a person sees of a run: `metrics.jsonl`, TensorBoard events and a curve PNG in the workdir.

Every line of `metrics.jsonl` is one JSON object with `step` and the values logged at that
step (train lines: loss terms, lr, examples/s; eval lines: `retrieval/i2t_r1`, ... in percent).
Only process 0 writes.
"""

from __future__ import annotations

import json
import os

import jax

METRICS_FILE = 'metrics.jsonl'
CURVE_FILE = 'training_curves.png'


class MetricWriter:
  def __init__(self, workdir: str):
    self.workdir = workdir
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if self.enabled:
      import tensorflow as tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **values}) + '\n')
    import tensorflow as tf
    with self._tb.as_default(step=int(step)):
      for k, v in values.items():
        tf.summary.scalar(k, v)
    self._tb.flush()

  def rewind(self, step: int) -> None:
    """Forget the rows after `step` (a resumed run is about to write them again), and a line
    cut short by a kill, so that metrics.jsonl reads as the straight run's."""
    self._rewrite(lambda row: row if row.get('step', 0) <= step else None)

  def forget(self, step: int, names) -> None:
    """Drop `names` from the rows at `step`: an evaluation run again at the same step replaces its
    earlier values instead of logging the step's metrics twice."""
    names = set(names)

    def edit(row):
      if row.get('step') != step:
        return row
      row = {k: v for k, v in row.items() if k not in names}
      return row if len(row) > 1 else None  # nothing left but the step

    self._rewrite(edit)

  def _rewrite(self, edit) -> None:
    if not self.enabled or not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          row = edit(json.loads(line))
        except json.JSONDecodeError:
          continue
        if row is not None:
          keep.append(json.dumps(row) + '\n')
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def plot(self) -> str | None:
    """Every logged series against the step (`curve_panels`), saved as a PNG."""
    if not self.enabled or not os.path.exists(self.path):
      return None
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    series: dict[str, list[tuple[int, float]]] = {}
    with open(self.path) as f:
      for line in f:
        row = json.loads(line)
        for k, v in row.items():
          if k != 'step':
            series.setdefault(k, []).append((row['step'], v))
    panels = curve_panels(series)
    last = max(step for points in series.values() for step, _ in points)
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (panel, names) in zip(axes.flat, panels.items()):
      for name in names:
        steps, values = zip(*series[name])
        ax.plot(steps, values, label=name.partition('/')[2] or name, marker='.' if len(steps) < 20 else None)
      ax.set_title(panel)
      ax.set_xlabel('step')
      ax.set_xlim(0, last * 1.03 or 1)  # every panel on the run's steps (an evaluation at the end sits at the end)
      if len(names) > 1:
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
      ax.axis('off')
    fig.tight_layout()
    out = os.path.join(self.workdir, CURVE_FILE)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def curve_panels(names) -> dict[str, list[str]]:
  """Panel title -> the series it draws, in drawing order: the total loss, then each loss term and
  each optimiser value (lr, gradient norm, alpha) alone, so none is flattened by another's scale;
  then each evaluator's metrics together (`retrieval`, `caption`, ...: percent), and the speed."""
  panels: dict[str, list[str]] = {}
  for name in names:
    prefix = name.partition('/')[0]
    panels.setdefault(name if prefix in ('train', 'opt') or '/' not in name else prefix, []).append(name)

  def order(title):
    if title == 'train/loss':
      return 0
    if title.startswith('train/'):
      return 1
    if title == 'opt/lr':
      return 2
    if title.startswith('opt/'):
      return 3
    return 5 if title == 'speed' else 4  # evaluators before the speed
  return dict(sorted(panels.items(), key=lambda item: (order(item[0]), item[0])))
