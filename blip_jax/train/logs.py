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
    """Every logged series against the step, one panel per prefix, saved as a PNG."""
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
    panels: dict[str, list[str]] = {}
    for name in series:
      panels.setdefault(name.split('/')[0] if '/' in name else 'train', []).append(name)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (panel, names) in zip(axes[0], sorted(panels.items())):
      for name in names:
        steps, values = zip(*series[name])
        ax.plot(steps, values, label=name, marker='.' if len(steps) < 20 else None)
      ax.set_title(panel)
      ax.set_xlabel('step')
      ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(self.workdir, CURVE_FILE)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
