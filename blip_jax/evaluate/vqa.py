"""VQA accuracy as the VQAv2 evaluation computes it.

An answer is normalised (punctuation, number words to digits, articles dropped, common
contractions restored), then scored against the human answers of its question: for each human,
`min(1, matches among the other humans / 3)`, averaged over the humans (the official
leave-one-out form of "3 of 10 annotators agree"). The accuracy of a set is the mean, in percent.
"""

from __future__ import annotations

import re

_PUNCT = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!']
_COMMA_IN_NUMBER = re.compile(r'(\d)(,)(\d)')
_PERIOD = re.compile(r'(?!<=\d)(\.)(?!\d)')  # a period not followed by a digit (the official pattern)
_NUMBERS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5', 'six': '6',
            'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
_ARTICLES = {'a', 'an', 'the'}
_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldnt': "couldn't", 'didnt': "didn't",
    'doesnt': "doesn't", 'dont': "don't", 'hadnt': "hadn't", 'hasnt': "hasn't", 'havent': "haven't",
    'hes': "he's", 'im': "i'm", 'isnt': "isn't", 'itll': "it'll", 'ive': "i've", 'lets': "let's",
    'shouldnt': "shouldn't", 'thats': "that's", 'theres': "there's", 'theyre': "they're", 'wasnt': "wasn't",
    'werent': "weren't", 'whats': "what's", 'wheres': "where's", 'whos': "who's", 'wont': "won't",
    'wouldnt': "wouldn't", 'youre': "you're", 'youve': "you've",
}


def normalize_answer(answer: str) -> str:
  text = answer.replace('\n', ' ').replace('\t', ' ').strip().lower()
  out = text
  for p in _PUNCT:  # glued punctuation becomes a space, punctuation next to a space disappears
    if (p + ' ' in text or ' ' + p in text) or _COMMA_IN_NUMBER.search(text):
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  out = _PERIOD.sub('', out)
  words = [_NUMBERS.get(w, w) for w in out.split() if w not in _ARTICLES]
  return ' '.join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
  """Accuracy in [0, 1] of one predicted answer against the (usually 10) human answers."""
  if not human_answers:
    raise ValueError('vqa_accuracy needs the human answers of the question')
  pred = normalize_answer(prediction)
  answers = [normalize_answer(a) for a in human_answers]
  matches = sum(a == pred for a in answers)
  return sum(min(1.0, (matches - (a == pred)) / 3.0) for a in answers) / len(answers)


def mean_vqa_accuracy(predictions: list[str], human_answers: list[list[str]]) -> float:
  """Mean accuracy in percent over questions."""
  if len(predictions) != len(human_answers):
    raise ValueError(f'{len(predictions)} predictions for {len(human_answers)} questions')
  return 100.0 * sum(vqa_accuracy(p, h) for p, h in zip(predictions, human_answers)) / len(predictions)
