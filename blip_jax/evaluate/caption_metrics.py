"""Caption metrics with the definitions of pycocoevalcap (the COCO caption evaluation).

- BLEU-1..4: corpus-level, clipped n-gram precision, brevity penalty against the reference
  length closest to each candidate's (pycocoevalcap's `option='closest'`);
- ROUGE-L: longest common subsequence F-score (beta 1.2) from the best precision and the best
  recall over the references, averaged over images;
- CIDEr-D: tf-idf n-gram vectors (n = 1..4, document frequencies over the evaluated images'
  references), clipped cosine, Gaussian length penalty (sigma 6), x 10;
- METEOR (optional): the METEOR 1.5 tool itself (Java; its jar and paraphrase table come with the
  `pycocoevalcap` package, or set METEOR_JAR), scored as the COCO evaluation scores it: one corpus
  score from every image's statistics, with `-l en -norm`.

`caption_metrics` takes captions as written (raw references, as BLIP scores COCO) and tokenises
them as the COCO evaluation does (`ptb_tokenizer`: Stanford's PTB tokenizer, lower case,
punctuation dropped) before scoring; the scorers below take those tokenised texts (tokens joined
by spaces), as pycocoevalcap's do.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import subprocess

from blip_jax.evaluate import ptb_tokenizer


def ngrams(tokens: list[str], n: int = 4) -> collections.Counter:
  return collections.Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def bleu(candidates: list[str], references: list[list[str]], n: int = 4) -> list[float]:
  """Corpus BLEU-1..n of `candidates[i]` against `references[i]` (tokenised texts)."""
  tiny, small = 1e-15, 1e-9
  test_len = ref_len = 0
  guess, correct = [0] * n, [0] * n
  for cand, refs in zip(candidates, references):
    c = cand.split()
    ref_tokens = [r.split() for r in refs]
    max_counts = collections.Counter()
    for r in ref_tokens:
      max_counts |= ngrams(r, n)
    lengths = [len(r) for r in ref_tokens]
    ref_len += min(lengths, key=lambda length: (abs(length - len(c)), length))
    test_len += len(c)
    for gram, count in ngrams(c, n).items():
      correct[len(gram) - 1] += min(count, max_counts[gram])
    for k in range(n):
      guess[k] += max(len(c) - k, 0)
  scores, product = [], 1.0
  for k in range(n):
    product *= (correct[k] + tiny) / (guess[k] + small)
    scores.append(product ** (1.0 / (k + 1)))
  ratio = (test_len + tiny) / (ref_len + small)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
  """CIDEr-D of the candidates (mean over images)."""
  refs = [[ngrams(r.split(), n) for r in rs] for rs in references]
  df = collections.Counter()
  for image_refs in refs:
    df.update(set(g for r in image_refs for g in r))
  log_images = math.log(float(len(refs)))

  def vector(counts):
    vec = [dict() for _ in range(n)]
    norm = [0.0] * n
    for gram, tf in counts.items():
      k = len(gram) - 1
      vec[k][gram] = float(tf) * (log_images - math.log(max(1.0, df[gram])))
      norm[k] += vec[k][gram] ** 2
    length = sum(tf for gram, tf in counts.items() if len(gram) == 1)
    return vec, [math.sqrt(x) for x in norm], length

  def sim(hyp, ref):
    (vh, nh, lh), (vr, nr, lr) = hyp, ref
    val = [0.0] * n
    for k in range(n):
      for gram in vh[k]:
        val[k] += min(vh[k][gram], vr[k].get(gram, 0.0)) * vr[k].get(gram, 0.0)
      if nh[k] != 0 and nr[k] != 0:
        val[k] /= nh[k] * nr[k]
      val[k] *= math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
    return val

  total = 0.0
  for cand, image_refs in zip(candidates, refs):
    hyp = vector(ngrams(cand.split(), n))
    score = [0.0] * n
    for r in image_refs:
      score = [a + b for a, b in zip(score, sim(hyp, vector(r)))]
    total += sum(score) / n / len(image_refs) * 10.0
  return total / len(candidates)


def _lcs(a: list[str], b: list[str]) -> int:
  row = [0] * (len(b) + 1)
  for x in a:
    prev = 0
    for j, y in enumerate(b):
      prev, row[j + 1] = row[j + 1], prev + 1 if x == y else max(row[j + 1], row[j])
  return row[-1]


def rouge_l(candidates: list[str], references: list[list[str]], beta: float = 1.2) -> float:
  total = 0.0
  for cand, refs in zip(candidates, references):
    c = cand.split()
    lcs = [(_lcs(r.split(), c), len(r.split())) for r in refs]
    precision = max(n / len(c) for n, _ in lcs) if c else 0.0
    recall = max(n / length for n, length in lcs)
    if precision and recall:
      total += (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
  return total / len(candidates)


def meteor_jar() -> str | None:
  """The METEOR 1.5 jar: $METEOR_JAR, else the one `pycocoevalcap` ships; None if neither exists."""
  return ptb_tokenizer.pycocoevalcap_jar('METEOR_JAR', 'meteor', 'meteor-1.5.jar')


def meteor_available() -> bool:
  return shutil.which('java') is not None and meteor_jar() is not None


def meteor(candidates: list[str], references: list[list[str]]) -> float:
  """METEOR of the candidates: the tool's corpus score over all images (not a mean of image scores).

  Talks to one `java -jar meteor-1.5.jar - - -stdio` process: a SCORE line per image returns that
  image's match statistics, one EVAL line over all of them returns a score per image and then the
  corpus score. Lines are exchanged one at a time so neither side's pipe fills up.
  """
  java, jar = shutil.which('java'), meteor_jar()
  if java is None or jar is None:
    raise RuntimeError('METEOR needs a Java runtime on PATH and the METEOR 1.5 jar '
                       '(pip install pycocoevalcap, or set METEOR_JAR)')
  # Its paraphrase table (data/paraphrase-en.gz) is found relative to the jar's folder.
  proc = subprocess.Popen([java, '-jar', '-Xmx2G', jar, '-', '-', '-stdio', '-l', 'en', '-norm'],
                          cwd=os.path.dirname(jar), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)

  def ask(line: str) -> str:
    proc.stdin.write(line + '\n')
    proc.stdin.flush()
    return read()

  def read() -> str:
    answer = proc.stdout.readline()
    if not answer:
      raise RuntimeError(f'METEOR ({jar}) stopped: {proc.stderr.read()[-2000:]}')
    return answer.strip()

  try:
    # "|||" separates fields in the tool's protocol (pycocoevalcap drops it from the texts too).
    clean = lambda text: ' '.join(text.replace('|||', '').split())
    stats = [ask(' ||| '.join(['SCORE', *(clean(r) for r in refs), clean(cand)]))
             for cand, refs in zip(candidates, references)]
    ask(' ||| '.join(['EVAL', *stats]))  # the first image's score
    for _ in range(len(stats) - 1):
      read()
    return float(read())
  finally:
    proc.stdin.close()
    proc.kill()
    proc.wait()


def caption_metrics(candidates: list[str], references: list[list[str]], *, with_meteor: bool = False) -> dict[str, float]:
  """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR if asked), in percent as the papers report them, of
  captions as written: candidates and references are PTB-tokenised first, as the COCO evaluation
  does (pycocoevalcap's `COCOEvalCap`)."""
  tokenized = ptb_tokenizer.tokenize([*candidates, *(r for refs in references for r in refs)])
  candidates, rest = tokenized[:len(candidates)], iter(tokenized[len(candidates):])
  references = [[next(rest) for _ in refs] for refs in references]
  b = bleu(candidates, references)
  scores = {**{f'bleu{k + 1}': 100 * v for k, v in enumerate(b)}, 'rouge_l': 100 * rouge_l(candidates, references),
            'cider': 100 * cider_d(candidates, references)}
  if with_meteor:
    scores['meteor'] = 100 * meteor(candidates, references)
  return scores
