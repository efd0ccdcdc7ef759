"""Caption metrics agree with pycocoevalcap (the COCO caption evaluation) on a fixed set."""

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from blip_jax.evaluate import caption_metrics as captions

# Lowercase words without punctuation: what pycocoevalcap's PTB tokenizer would hand its scorers.
CANDIDATES = ['a man riding a horse on a beach', 'two dogs play in the snow', 'a plate of food',
              'a red bus driving down the street', 'a cat', 'a large green triangle at the top left of the image']
REFERENCES = [
    ['a man rides a horse along the beach', 'a person on a horse at the shore', 'horse and rider on sand'],
    ['two dogs playing in snow', 'dogs run through the snow', 'a pair of dogs in a snowy field', 'snow dogs'],
    ['a plate with food on it', 'a dish of pasta and vegetables'],
    ['a red double decker bus on a city street', 'a bus driving down the road', 'red bus in traffic'],
    ['a cat sitting on a couch', 'a small kitten looking at the camera'],
    ['a large green triangle at the top', 'a picture of a large green triangle', 'one green triangle'],
]


def _coco(items):
  return {i: list(v) if isinstance(v, list) else [v] for i, v in enumerate(items)}


@pytest.mark.parametrize('subset', [slice(None), slice(0, 3), slice(3, 6), slice(4, 5)])
def test_bleu_rouge_cider_equal_pycocoevalcap(subset):
  cands, refs = CANDIDATES[subset], REFERENCES[subset]
  gts, res = _coco(refs), _coco(cands)
  ours = captions.caption_metrics(cands, refs)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  np.testing.assert_allclose([ours[f'bleu{k}'] for k in range(1, 5)], 100 * np.asarray(bleu), rtol=1e-9, atol=1e-9)
  rouge, _ = Rouge().compute_score(gts, res)
  np.testing.assert_allclose(ours['rouge_l'], 100 * rouge, rtol=1e-9)
  cider, _ = Cider().compute_score(gts, res)
  np.testing.assert_allclose(ours['cider'], 100 * cider, rtol=1e-9)


@pytest.mark.skipif(not captions.meteor_available(), reason='METEOR needs a Java runtime (none on this machine)')
@pytest.mark.parametrize('subset', [slice(None), slice(4, 5)])
def test_meteor_equals_pycocoevalcap(subset):
  from pycocoevalcap.meteor.meteor import Meteor
  cands, refs = CANDIDATES[subset], REFERENCES[subset]
  ours = captions.caption_metrics(cands, refs, with_meteor=True)['meteor']
  reference, per_image = Meteor().compute_score(_coco(refs), _coco(cands))
  np.testing.assert_allclose(ours, 100 * reference, rtol=1e-9)
  assert 0 < ours < 100 and len(per_image) == len(cands)


def test_meteor_reports_a_missing_jar(monkeypatch, tmp_path):
  monkeypatch.setenv('METEOR_JAR', str(tmp_path / 'nope.jar'))
  with pytest.raises(FileNotFoundError, match='nope.jar'):
    captions.caption_metrics(CANDIDATES, REFERENCES, with_meteor=True)
