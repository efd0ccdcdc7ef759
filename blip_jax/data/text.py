"""Caption and question cleaning with exactly the rules of salesforce/BLIP `data/utils.py`.

The originals' quirks are kept on purpose, because checkpoints were trained and evaluated on
text cleaned this way:
- captions: lowercase; each of `.!"()*#:;~` becomes a space; runs of two or more whitespace
  characters become one space (a single tab or newline is kept); trailing newlines and
  surrounding spaces are stripped; at most `max_words` space-separated words are kept;
- questions: lowercase; the same characters are deleted (not replaced by a space); only trailing
  spaces are stripped; at most `max_words` space-separated words are kept.
"""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r'[.!"()*#:;~]')
_WHITESPACE_RUN = re.compile(r'\s{2,}')


def _truncate(text: str, max_words: int) -> str:
  words = text.split(' ')
  return ' '.join(words[:max_words]) if len(words) > max_words else text


def pre_caption(caption: str, max_words: int = 50) -> str:
  caption = _PUNCTUATION.sub(' ', caption.lower())
  caption = _WHITESPACE_RUN.sub(' ', caption)
  caption = caption.rstrip('\n').strip(' ')
  return _truncate(caption, max_words)


def pre_question(question: str, max_words: int = 50) -> str:
  question = _PUNCTUATION.sub('', question.lower()).rstrip(' ')
  return _truncate(question, max_words)
