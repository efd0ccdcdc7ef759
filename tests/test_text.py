"""Caption / question cleaning against the originals' rules (salesforce/BLIP data/utils.py),
on strings where the rules' quirks show. Expected values are worked out by hand from the rules."""

import pytest

from blip_jax.data.text import pre_caption, pre_question

CAPTIONS = [
    # lowercase; '.' becomes a space and the trailing space is stripped
    ('A Dog on the Beach.', 'a dog on the beach'),
    # each listed character becomes a space; the resulting double spaces collapse to one
    ('a "red" (small) car!', 'a red small car'),
    # characters not in the list (comma, apostrophe, hyphen, ?) are kept
    ("a man's half-eaten pizza, right?", "a man's half-eaten pizza, right?"),
    # a single tab or newline is not collapsed (only runs of 2+ whitespace are)
    ('two\tcats', 'two\tcats'),
    ('two \tcats', 'two cats'),
    # leading and trailing spaces go; trailing newlines go before the space strip
    ('  a cat on a mat \n', 'a cat on a mat'),
    # '#', '*', ':', ';', '~' too
    ('#1: a*b;c~d', '1 a b c d'),
    ('', ''),
]


@pytest.mark.parametrize('raw,expected', CAPTIONS)
def test_pre_caption(raw, expected):
  assert pre_caption(raw) == expected


def test_pre_caption_truncates_words():
  assert pre_caption('one two three four', max_words=3) == 'one two three'
  assert pre_caption('one two three', max_words=3) == 'one two three'
  # punctuation turned to spaces is collapsed before counting words
  assert pre_caption('one. two. three. four.', max_words=2) == 'one two'


QUESTIONS = [
    # characters are deleted, not replaced: "what's" keeps its apostrophe, '?' is not in the list
    ('What color is the "bus"?', 'what color is the bus?'),
    # only trailing spaces are stripped; leading ones and inner runs stay
    ('  is it (really) red.  ', '  is it really red'),
    ('How many: dogs;', 'how many dogs'),
]


@pytest.mark.parametrize('raw,expected', QUESTIONS)
def test_pre_question(raw, expected):
  assert pre_question(raw) == expected


def test_pre_question_truncates_on_single_spaces():
  # a double space makes an empty "word", which counts
  assert pre_question('a  b c d', max_words=3) == 'a  b'
