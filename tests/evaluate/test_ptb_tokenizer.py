"""The COCO evaluation's tokenisation: `ptb_tokenizer.port` against Stanford's PTBTokenizer jar
that pycocoevalcap ships (run here with Java), and caption scores of raw captions against
pycocoevalcap end to end (PTBTokenizer, then Bleu / Rouge / Cider)."""

import re

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from blip_jax.data import examples
from blip_jax.data.text import pre_caption
from blip_jax.evaluate import caption_metrics, ptb_tokenizer

needs_java = pytest.mark.skipif(not ptb_tokenizer.jar_available(), reason='the reference tokenizer needs Java')

# Hyphens, apostrophes and contractions, numbers, abbreviations, quotes, brackets, symbols, dashes.
CORPUS = [
    "A man's black-and-white dog isn't running.",
    'Two people, a woman and a child, are on the beach!',
    '"The cat" sat on the mat; it\'s 3.5 ft tall.',
    "The U.S. flag at 10:30 a.m. (near the St. John's church)...",
    "Kids don't can't won't shouldn't they're we've I'm you'd she'll",
    'A 1,000-piece puzzle on a 2x4 board -- with 50% off & more?',
    "A bus/truck parked near the cafe's entrance",
    "It's the people's choice: cats' toys",
    'A  man   with extra    spaces',
    'Mr. Smith and Dr. Who visit NYC.',
    'an e-mail re: the co-op\'s well-known "best" pizza',
    "A sign that says 'stop' at 5pm",
    'There are 3 dogs. One is brown.',
    'a man riding a horse',
    'A woman holding an umbrella in the rain.',
    "The #1 player's T-shirt costs $20.",
    'an 18-wheeler on I-95',
    'people watch t.v. in the living room',
    'A hot dog with ketchup,mustard and onions',
    'A vase of flowers sitting on a table..',
    "A woman's hand-held umbrella, in the 90's style.",
    "Rock'n'roll band at 5 o'clock",
    'An old man (with a cane) walks by.',
    'A group of people e.g. tourists, i.e. visitors, etc.',
    'What is this?? A bird!!!',
    'A dog.The dog is brown',
    'Three cats--one black--on a sofa',
    'a 3-4 year old boy',
    'A man on a 1.5m ladder',
    'a sign reading "no parking" near a café',
    'two surfers — one falling',
    '   leading and trailing spaces   ',
    'A plate of food: rice, beans, and meat.',
    "The children's toys and the kids' games",
    "People standing around a 'food truck'",
    'A man wearing a [red] hat {and} shoes',
    'A pizza with pepperoni & cheese',
    'The word "STOP" painted on a wall',
    "a photo of a tennis player's racket.",
    'Is it a dog ?',
    'Hello... world',
    'a man riding a wave on top of a surfboard .',
    "A train's engine is yellow and black",
    "Someone's laptop, keyboard and mouse",
    "There's a clock that reads 12:45",
    'A cat laying on top of a T.V.',
    "it's raining cats & dogs!",
    'A street sign for "Main St." and "1st Ave."',
    'A bathroom with a toilet, sink, and mirror.',
    'A red fire-hydrant on the side-walk',
    'a red–blue flag – here',
    "the 'n' key",
    "5'n'5",
    'A 2.5kg bag'
]
# COCO-style captions as people write them (capitals, final periods, hyphens, possessives).
RAW_CANDIDATES = ["A man's black-and-white dog isn't running.", 'Two kids in T-shirts play frisbee on the beach!',
                  "a woman's hand-held umbrella", 'A double-decker bus at the U.S. border.']
RAW_REFERENCES = [
    ["A man's black and white dog is standing still.", 'A black-and-white dog near its owner.',
     "The dog's owner isn't there."],
    ['Two children playing frisbee, on a sandy beach.', 'Kids in t-shirts throw a frisbee (at the beach).'],
    ["A woman's umbrella is hand-held.", 'A lady holds an umbrella in the rain...'],
    ['A red double-decker bus.', "The bus's driver waits at a U.S. check-point.", 'A bus -- red -- on the road.'],
]


@needs_java
def test_port_equals_the_ptb_tokenizer_jar():
  reference = ptb_tokenizer.run_jar(CORPUS)
  keep = lambda tokens: [t for t in tokens if t not in ptb_tokenizer.PUNCTUATIONS]
  for line, expected in zip(CORPUS, reference):
    assert keep(ptb_tokenizer.port(line)) == keep(expected), line


@needs_java
def test_tokenize_equals_pycocoevalcaps_tokenizer_with_and_without_java(monkeypatch):
  coco = PTBTokenizer().tokenize({i: [{'caption': line}] for i, line in enumerate(CORPUS)})
  expected = [coco[i][0] for i in range(len(CORPUS))]
  assert ptb_tokenizer.tokenize(CORPUS) == expected  # the jar
  monkeypatch.setattr(ptb_tokenizer, 'jar_available', lambda: False)
  assert ptb_tokenizer.tokenize(CORPUS) == expected  # the port


@needs_java
@pytest.mark.parametrize('java', [True, False])
def test_scores_of_raw_captions_equal_the_coco_evaluation(java, monkeypatch):
  """What BLIP's `coco_caption_eval` computes: raw references and captions through PTBTokenizer,
  then the scorers."""
  tok = PTBTokenizer()
  gts = tok.tokenize({i: [{'caption': r} for r in refs] for i, refs in enumerate(RAW_REFERENCES)})
  res = tok.tokenize({i: [{'caption': c}] for i, c in enumerate(RAW_CANDIDATES)})
  if not java:
    monkeypatch.setattr(ptb_tokenizer, 'jar_available', lambda: False)
  ours = caption_metrics.caption_metrics(RAW_CANDIDATES, RAW_REFERENCES)
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  np.testing.assert_allclose([ours[f'bleu{k}'] for k in range(1, 5)], 100 * np.asarray(bleu), rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(ours['rouge_l'], 100 * Rouge().compute_score(gts, res)[0], rtol=1e-9)
  np.testing.assert_allclose(ours['cider'], 100 * Cider().compute_score(gts, res)[0], rtol=1e-9)
  # The words of `pre_caption`-cleaned texts (hyphens split, "'s" attached) score otherwise.
  cleaned = lambda text: ' '.join(re.sub(r"[^\w\s']", ' ', pre_caption(text, 100)).split())
  before = caption_metrics.bleu([cleaned(c) for c in RAW_CANDIDATES],
                                [[cleaned(r) for r in refs] for refs in RAW_REFERENCES])
  assert abs(100 * before[3] - ours['bleu4']) > 1


class _Tokenizer:
  def encode(self, texts, max_length):
    return np.zeros((len(texts), max_length), np.int32), np.ones((len(texts), max_length), np.int32)


def test_the_caption_evaluation_keeps_the_raw_references():
  records = [{'image_id': 0, 'captions': [b"A man's black-and-white dog.", b'A DOG!']},
             {'image_id': 1, 'captions': [b'Two cats (sleeping).']}]
  index = examples.retrieval_index('synthetic_scenes', records, _Tokenizer(), 8)
  assert index.raw_texts == ["A man's black-and-white dog.", 'A DOG!', 'Two cats (sleeping).']
  assert index.texts == [pre_caption(t, 30) for t in index.raw_texts]
