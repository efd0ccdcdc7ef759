"""VQA accuracy (normalisation and the leave-one-out 3-of-10 rule) and top-k accuracy, against
values worked out by hand."""

import numpy as np
import pytest

from blip_jax.evaluate.vqa import human_answers, mean_vqa_accuracy, normalize_answer, vqa_accuracy
from blip_jax.evaluate.zero_shot import topk_accuracy


@pytest.mark.parametrize('raw,normalized', [
    ('Two dogs!', '2 dogs'),            # glued punctuation -> space; number words -> digits
    ("The cat's toy.", "cat's toy"),    # final period dropped; articles dropped
    ('1,000', '1000'),                  # a comma inside a number disappears
    ('yes , sir', 'yes sir'),           # punctuation next to a space disappears
    ('3.5', '3.5'),                     # a decimal point stays
    ('dont  know\n', "don't know"),     # contractions restored, whitespace collapsed
    ('An Apple', 'apple'),
])
def test_normalize_answer(raw, normalized):
  assert normalize_answer(raw) == normalized


def test_vqa_accuracy_is_the_leave_one_out_3_of_10_rule():
  humans = ['yes'] * 2 + ['no'] * 8
  assert vqa_accuracy('Yes.', humans) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
  assert vqa_accuracy('no', humans) == 1.0
  assert vqa_accuracy('maybe', humans) == 0.0
  assert vqa_accuracy('red', ['red'] * 3 + ['blue'] * 7) == pytest.approx((3 * (2 / 3) + 7) / 10)  # 0.9
  assert vqa_accuracy('2', ['two'] * 10) == 1.0
  assert mean_vqa_accuracy(['no', 'maybe'], [humans, humans]) == pytest.approx(50.0)
  with pytest.raises(ValueError, match='2 predictions for 1 questions'):
    mean_vqa_accuracy(['a', 'b'], [humans])


def test_human_answers_from_unique_answers_and_weights():
  assert human_answers(['yes', 'no', ''], [0.2, 0.8, 0.0]) == ['yes'] * 2 + ['no'] * 8
  assert human_answers(['red'], [1.0]) == ['red'] * 10


def test_topk_accuracy():
  scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.2], [0.9, 0.0, 0.1]])
  # row 0: one class above the truth; row 1: a tie ranked first by index; row 2: the truth is top.
  assert topk_accuracy(scores, [2, 1, 0], ks=(1, 2, 3)) == pytest.approx({'top1': 100 / 3, 'top2': 100.0, 'top3': 100.0})
  assert topk_accuracy(scores, [0, 0, 1], ks=(1, 2)) == pytest.approx({'top1': 100 / 3, 'top2': 100 / 3})  # rows 0, 2: 2 above
  with pytest.raises(ValueError, match='scores must be'):
    topk_accuracy(scores[0], [0])
