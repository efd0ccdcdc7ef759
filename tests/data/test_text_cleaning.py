"""salesforce/BLIP's caption / question cleaning quirks (data/utils.py).

The original functions, in words:
  pre_caption(c, max_words=50):  c = re.sub('[.!"()*#:;~]', ' ', c.lower());
                                 c = re.sub(r'\\s{2,}', ' ', c); c = c.rstrip('\\n').strip(' ');
                                 keep the first max_words of c.split(' ') if there are more.
  pre_question(q, max_ques_words=50): q = re.sub('[.!"()*#:;~]', '', q.lower());
                                 q = q.rstrip(' '); the same truncation.
Each expected value below is derived by hand from these steps (the comment says which step does
what). The word limit is passed positionally: the original names it `max_ques_words` for
questions, blip_jax `max_words`.
"""

import pytest

from blip_jax.data.text import pre_caption, pre_question

CAPTIONS = [
    # '\s{2,}' also matches runs of tabs: both runs become one space
    ('A  Man\t\tRiding', 'a man riding'),
    # '...' -> three spaces -> one space
    ('Hello...World', 'hello world'),
    # rstrip('\n') removes a final newline
    ('end of line\n', 'end of line'),
    # a single trailing tab is neither collapsed (run of 1) nor stripped (strip(' ') only)
    ('tab at end\t', 'tab at end\t'),
    # ' \n' is a whitespace run of 2 -> ' ', then strip(' ') removes it
    ('x \n', 'x'),
    # a single leading newline survives: rstrip works on the right only, strip(' ') on spaces
    ('\nstart', '\nstart'),
    # '?', ',', '%', '-' are not in the list
    ('What? Yes, 100% sure - OK', 'what? yes, 100% sure - ok'),
    # lower() only: accents and German sharp s are kept as they are
    ('ÉCOLE Straße', 'école straße'),
    # only listed characters -> spaces -> one space -> stripped to nothing
    ('~*~', ''),
    # square and curly brackets are not in the list
    ('a [b] {c}', 'a [b] {c}'),
    # '"' -> space; "it's  quoted " collapses and strips; the apostrophe stays
    ('It\'s "quoted"', "it's quoted"),
    # re's \s is Unicode-aware: two no-break spaces collapse to one ASCII space ...
    ('a\u00a0\u00a0b', 'a b'),
    # ... but a single one is kept
    ('a\u00a0b', 'a\u00a0b'),
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
def test_pre_caption_quirks(raw, expected):
  assert pre_caption(raw) == expected


def test_pre_caption_truncation_counts_space_separated_words():
  # a tab does not separate words for split(' '): 'a\tb' is one word
  assert pre_caption('a\tb c', 1) == 'a\tb'
  # whitespace runs collapse before counting
  assert pre_caption('a  b  c', 2) == 'a b'
  # exactly max_words: unchanged; zero words allowed: nothing left
  assert pre_caption('one two three', 3) == 'one two three'
  assert pre_caption('one two', 0) == ''
  # default is 50
  long = ' '.join(f'w{i}' for i in range(60))
  assert pre_caption(long) == ' '.join(f'w{i}' for i in range(50))


QUESTIONS = [
    ('What is this?', 'what is this?'),
    # '.' is deleted, not replaced: 3.5 becomes 35
    ('Is it 3.5 m long?', 'is it 35 m long?'),
    # inner runs of spaces stay (no collapsing in pre_question), '!' goes, '?' stays
    ("Who's   there?!", "who's   there?"),
    # rstrip(' ') stops at the final newline: nothing is stripped at all
    ('  lead and trail  \n', '  lead and trail  \n'),
    ('a (b) c', 'a b c'),
    # 'hmm ok ' after deleting the dots, then the trailing space goes
    ('Hmm... ok .', 'hmm ok'),
    ('Q: A; B~', 'q a b'),
    # characters are deleted, not replaced: "what's" keeps its apostrophe, '?' is not in the list
    ('What color is the "bus"?', 'what color is the bus?'),
    # only trailing spaces are stripped; leading ones and inner runs stay
    ('  is it (really) red.  ', '  is it really red'),
    ('How many: dogs;', 'how many dogs'),
]


@pytest.mark.parametrize('raw,expected', QUESTIONS)
def test_pre_question_quirks(raw, expected):
  assert pre_question(raw) == expected


def test_pre_question_truncation_keeps_empty_words():
  # split(' ') of 'a b  c d' is ['a', 'b', '', 'c', 'd']: three words are 'a', 'b', '' ->
  # 'a b ' with a trailing space (nothing strips after truncating)
  assert pre_question('a b  c d', 3) == 'a b '
  # leading spaces are words too: ['', '', 'a', 'b'] -> '' + ' ' + '' = ' '
  assert pre_question('  a b', 2) == ' '
  assert pre_question('a b c', 3) == 'a b c'


def test_pre_caption_truncates_words():
  assert pre_caption('one two three four', max_words=3) == 'one two three'
  assert pre_caption('one two three', max_words=3) == 'one two three'
  # punctuation turned to spaces is collapsed before counting words
  assert pre_caption('one. two. three. four.', max_words=2) == 'one two'


def test_pre_question_truncates_on_single_spaces():
  # a double space makes an empty "word", which counts
  assert pre_question('a  b c d', max_words=3) == 'a  b'
