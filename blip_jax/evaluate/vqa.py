"""VQA accuracy as the VQAv2 evaluation computes it.

An answer is normalised (punctuation, number words to digits, articles dropped, common
contractions restored), then scored against the human answers of its question: for each human,
`min(1, matches among the other humans / 3)`, averaged over the humans (the official
leave-one-out form of "3 of 10 annotators agree"). The accuracy of a set is the mean, in percent.

The evaluator answers every eval question with the best-ranked of the candidate answers (every
answer of the training examples) by the original's rule: the `k_test` (128) candidates whose first
token is likeliest are scored, the best of them wins; it reports `accuracy`.
"""

from __future__ import annotations

import re

import numpy as np

from blip_jax import distributed
from blip_jax.evaluate.context import EvalContext

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


def human_answers(answers: list[str], weights, votes: int = 10) -> list[str]:
  """The annotators' answers behind unique answers and their weights (shares of `votes` human
  answers, VQAv2's 10 per question), for the VQA accuracy."""
  return [a for a, w in zip(answers, weights) for _ in range(int(round(float(w) * votes)))]


def answer_list(train_examples, tokenizer) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """The candidate answers: every answer with weight in the training examples (sorted)."""
  ids = train_examples.columns['answer_ids']
  weights = train_examples.columns['weights']
  unique = np.unique(ids[weights > 0], axis=0)
  mask = (unique != tokenizer.pad_token_id).astype(np.int32)
  return unique, mask, tokenizer.decode(unique)


class Evaluator:
  def __init__(self, ctx: EvalContext, *, batch_size: int = 64, k_test: int = 128):
    ctx.require('vqa', 'question_states', 'rank_answers')
    if ctx.train_examples is None or 'answer_ids' not in ctx.train_examples.columns:
      raise ValueError('evals.vqa ranks the training answers: it needs a run on VQA examples')
    self.tokenizer = ctx.tokenizer
    self.examples = ctx.loader(ctx.examples('vqa'), batch_size)
    a_ids, a_mask, self.answers = answer_list(ctx.train_examples, ctx.tokenizer)

    def best(m, images, q_ids, q_mask):
      return m.rank_answers(m.question_states(m.image_embeds(images), q_ids, q_mask), q_mask, a_ids, a_mask, k_test)

    self.best = ctx.jit(best)

  def run(self, state) -> dict[str, float]:
    predictions, humans = [], []
    for batch in self.examples.epoch():
      best = distributed.to_host(self.best(state, batch['image'], batch['question_ids'], batch['question_mask']))
      valid, weights, answers = distributed.to_host((batch['valid'], batch['weights'], batch['answer_ids']))
      for row in np.flatnonzero(valid):
        predictions.append(self.answers[best[row]])
        humans.append(human_answers(self.tokenizer.decode(answers[row]), weights[row]))
    return {'accuracy': mean_vqa_accuracy(predictions, humans)}
