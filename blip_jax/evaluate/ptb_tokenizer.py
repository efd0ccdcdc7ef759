"""The tokenisation of the COCO caption evaluation (pycocoevalcap's `PTBTokenizer`): Stanford
CoreNLP's Penn Treebank tokenizer (`-preserveLines -lowerCase`), then the tokens in
`PUNCTUATIONS` dropped. BLIP scores its captions this way, references raw as COCO gives them.

`tokenize` runs that tokenizer itself when it can (Java on PATH and the CoreNLP jar that the
`pycocoevalcap` package ships, or $PTB_TOKENIZER_JAR); otherwise it applies `port`, this file's
statement of the rules captions meet: contractions (`do n't`, `man 's`, `cats '`), quotes as
`` `` `` / `''`, brackets as `-lrb-` ... (which the punctuation list, written in upper case, does
not remove after lower-casing), separated `, ; : ! ? % $ #` and sentence periods, while
hyphenated words, numbers (`3.5`, `1,000`, `10:30`), abbreviations (`u.s.`, `mr.`) and `a/b` stay
whole. `tests/evaluate/test_ptb_tokenizer.py` checks the port against the jar.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

# pycocoevalcap's list (tokenizer/ptbtokenizer.py).
PUNCTUATIONS = frozenset(["''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!', ',', ':', '-',
                          '--', '...', ';'])
_MAIN_CLASS = 'edu.stanford.nlp.process.PTBTokenizer'


def pycocoevalcap_jar(env_var: str, folder: str, name: str) -> str | None:
  """$`env_var`, else the jar `name` that `pycocoevalcap` ships in `folder` (its tokenizer's
  CoreNLP, its METEOR); None if neither exists."""
  jar = os.environ.get(env_var)
  if jar:
    if not os.path.isfile(jar):
      raise FileNotFoundError(f'{env_var}={jar} does not exist')
    return jar
  try:
    import pycocoevalcap
  except ImportError:
    return None
  jar = os.path.join(list(pycocoevalcap.__path__)[0], folder, name)
  return jar if os.path.isfile(jar) else None


def tokenizer_jar() -> str | None:
  return pycocoevalcap_jar('PTB_TOKENIZER_JAR', 'tokenizer', 'stanford-corenlp-3.4.1.jar')


def jar_available() -> bool:
  return shutil.which('java') is not None and tokenizer_jar() is not None


def tokenize(texts: list[str]) -> list[str]:
  """Each text as the COCO evaluation scores it: lower-case PTB tokens without punctuation,
  joined by single spaces (pycocoevalcap's `PTBTokenizer().tokenize`)."""
  lines = [t.replace('\n', ' ') for t in texts]
  tokenized = run_jar(lines) if jar_available() else [port(line) for line in lines]
  return [' '.join(w for w in tokens if w not in PUNCTUATIONS) for tokens in tokenized]


def run_jar(lines: list[str]) -> list[list[str]]:
  """CoreNLP's PTBTokenizer on `lines`, one line each, as pycocoevalcap calls it."""
  if not lines:
    return []
  with tempfile.NamedTemporaryFile('w', suffix='.txt', delete=False, encoding='utf-8') as f:
    f.write('\n'.join(lines))
  try:
    out = subprocess.run(['java', '-cp', tokenizer_jar(), _MAIN_CLASS, '-preserveLines', '-lowerCase', f.name],
                         capture_output=True, text=True, encoding='utf-8', check=False)
  finally:
    os.remove(f.name)
  result = out.stdout.split('\n')[:len(lines)]
  if out.returncode or len(result) != len(lines):
    raise RuntimeError(f'{_MAIN_CLASS} ({tokenizer_jar()}) failed on {len(lines)} lines: {out.stderr[-2000:]}')
  return [line.split() for line in result]


# ------------------------------------------------------------------------------ the port

_BRACKETS = {'(': '-lrb-', ')': '-rrb-', '[': '-lsb-', ']': '-rsb-', '{': '-lcb-', '}': '-rcb-'}  # lower-cased
_LEADING = '([{$#"\''  # peeled off the front of a word
_TRAILING = ',;:!?)]}%"\''  # and off its end
# Words whose final period belongs to them (CoreNLP's list is longer; these are the ones captions use).
_ABBREVIATIONS = frozenset(['mr', 'mrs', 'ms', 'dr', 'st', 'jr', 'sr', 'prof', 'mt', 'ft', 'vs', 'etc', 'inc', 'co',
                            'corp', 'ltd', 'ave', 'blvd', 'jan', 'feb', 'mar', 'apr', 'jun', 'jul', 'aug', 'sep', 'sept',
                            'oct', 'nov', 'dec'])
_ACRONYM = re.compile(r'^(?:[a-z]\.)+$')  # u.s. a.m. t.v.
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'m|'d|'ll)$")
# Inside a word: a comma or colon not between two digits (1,000 and 10:30 stay), and `--`.
_INNER = re.compile(r'--|(?<!\d)[,:]|[,:](?!\d)')
_DASHES = {'\u2014': '--', '\u2013': '--'}  # em and en dash, within words too
_UNIT = re.compile(r'^(\d+(?:\.\d+)+)([a-z]+)$')  # 1.5m (but 5pm and 2x4 stay whole)


def port(line: str) -> list[str]:
  """PTB tokens of one line, lower-cased (without CoreNLP)."""
  line = line.lower().replace("'n'", " 'n' ")  # rock'n'roll
  for dash, ascii_dash in _DASHES.items():
    line = line.replace(dash, f' {ascii_dash} ')
  return [token for chunk in line.split() for token in ([chunk] if chunk == "'n'" else _word(chunk))]


def _word(word: str) -> list[str]:
  """The tokens of one whitespace-free chunk: leading and trailing punctuation peeled off, what
  is left split at inner punctuation (each part a word again), else a contraction or unit split off."""
  lead, tail = [], []
  while len(word) > 1 and word[0] in _LEADING:
    lead.append({'"': '``', "'": '`'}.get(word[0], word[0]))
    word = word[1:]
  while len(word) > 1 and (word[-1] in _TRAILING or word[-1] == '.'):
    piece = '...' if word.endswith('...') else word[-1]
    if piece in '?!':  # a run of them is one token (`??`, `!!!`)
      piece = word[len(word.rstrip(piece)):] or piece
    if piece == '.' and (_ACRONYM.match(word) or word[:-1] in _ABBREVIATIONS):
      break
    tail.insert(0, "''" if piece == '"' else piece)
    word = word[:-len(piece)]
  if _INNER.search(word):
    middle = [t for p in re.split(f'({_INNER.pattern})', word) if p for t in ([p] if _INNER.fullmatch(p) else _word(p))]
  else:
    m = _CONTRACTION.match(word) or _UNIT.match(word)
    middle = list(m.groups()) if m else [word]
  return [_BRACKETS.get(t, t) for t in lead + middle + tail]
