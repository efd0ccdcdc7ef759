"""`python -m blip_jax.predict` (over `blip_jax.Predictor`) end to end on tiny checkpoints and
synthetic_scenes images: every subcommand's output equals the model functions it stands for,
computed here directly; bad inputs are reported and skipped."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import blip_jax
from blip_jax import generate, model_io, predict, registry
from blip_jax.data.tokenizer import BlipTokenizer, HFTokenizer
from blip_jax.data.transforms import image_function
from blip_jax.models import blip, blip2, clip

SIZE = 32


@pytest.fixture(scope='module')
def scenes(tmp_path_factory, scenes_builder, scenes_vocab):
  """Six synthetic_scenes images as PNG files, the dataset's vocabulary and its first captions."""
  folder = tmp_path_factory.mktemp('images')
  source = scenes_builder.as_data_source('validation')
  captions = []
  for i in range(6):
    Image.fromarray(np.asarray(source[i]['image'])).save(folder / f'scene{i}.png')
    captions.append(source[i]['captions'][0].decode())
  return folder, scenes_vocab, captions


def _save(tmp_path_factory, name, model, config, task, tokenizer):
  out = tmp_path_factory.mktemp(name) / 'model'
  model_io.save(out, model, config, task=task, tokenizer=tokenizer)
  return out


def _blip_config(tok):
  return blip.blip_config('base', SIZE, vision=dict(width=32, depth=2, num_heads=2, mlp_dim=48, patch_size=8),
                          text=dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                                    vocab_size=tok.vocab_size),
                          embed_dim=16, bos_token_id=tok.bos_token_id, enc_token_id=tok.enc_token_id,
                          sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)


def _tiny_blip(scenes, tmp_path_factory, task, seed):
  """A random tiny BLIP `task` model saved as train.py saves one (with its vocab.txt)."""
  tok = BlipTokenizer(scenes[1])
  config = _blip_config(tok)
  model = registry.build('blip', task, config, seed=seed)
  return _save(tmp_path_factory, task, model, config, task, tok), model, tok


@pytest.fixture(scope='module')
def pretrained(scenes, tmp_path_factory):
  """BLIP pretraining: ITC, ITM and the decoder."""
  return _tiny_blip(scenes, tmp_path_factory, 'pretrain', seed=3)


def _pixels(paths, kind='blip_eval'):
  fn = image_function(kind, SIZE)
  return np.stack([fn(np.asarray(Image.open(p).convert('RGB')), (0, 0)) for p in paths])


def _run(*argv):
  return predict.run([str(a) for a in argv])


def _jsonl(text):
  return [json.loads(line) for line in text.splitlines()]


def test_caption_equals_beam_search_and_reports_confidence(scenes, pretrained):
  folder, _, _ = scenes
  ckpt, model, tok = pretrained
  rows = _run('caption', '--checkpoint', ckpt, '--batch-size', 4, '--min-length', 3, '--max-length', 9, folder)
  paths = sorted(str(p) for p in folder.glob('*.png'))
  assert [r['image'] for r in rows] == paths  # 6 images over two batches of 4 (the last padded)
  prompt = tok.encode(['a picture of '], 16, 'dec')
  prompt = prompt[0][:, :int(prompt[1].sum()) - 1]
  embeds = model.image_embeds(_pixels(paths))
  ids = generate.beam_search(model.text_decoder, embeds, np.repeat(prompt, 6, 0), num_beams=3, max_length=9,
                             min_length=3, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)[0][:, 0]
  expected = [t[len('a picture of'):].strip() for t in tok.decode(ids)]
  assert [r['caption'] for r in rows] == expected
  # confidence: the geometric mean probability of the generated tokens, token by token in numpy.
  ids = np.asarray(ids)
  logits = np.asarray(model.text_decoder(ids, (ids != tok.pad_token_id).astype(np.int32), embeds))
  for row, seq, lg in zip(rows, ids, logits):
    logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    picked = [logp[t - 1, seq[t]] for t in range(prompt.shape[1], len(seq)) if seq[t] != tok.pad_token_id]
    assert row['confidence'] == pytest.approx(np.exp(np.mean(picked)), abs=1e-4)
  # nucleus sampling: reproducible with the seed, and top_k=1 is greedy decoding.
  sampled = _run('caption', '--checkpoint', ckpt, '--sample', '--top-k', 1, '--max-length', 9, folder)
  greedy = _run('caption', '--checkpoint', ckpt, '--beams', 1, '--max-length', 9, folder)
  assert [r['caption'] for r in sampled] == [r['caption'] for r in greedy]


def test_itm_scores_every_image_with_every_text(scenes, pretrained):
  folder, _, captions = scenes
  ckpt, model, tok = pretrained
  texts = captions[:2]
  rows = _run('itm', '--checkpoint', ckpt, '--text', texts[0], '--text', texts[1], folder / 'scene0.png',
              folder / 'scene3.png')
  embeds = model.image_embeds(_pixels([folder / 'scene0.png', folder / 'scene3.png']))
  ids, mask = tok.encode([tok.clean(t) for t in texts], 35)
  cosine = np.asarray(model.similarity(model.image_features(embeds), model.text_features(model.text_embeds(ids, mask))))
  for row in rows:
    i, j = int(row['image'].endswith('scene3.png')), texts.index(row['text'])
    match = jax.nn.softmax(model.itm_logits(embeds[i:i + 1], ids[j:j + 1], mask[j:j + 1]))[0, 1]
    assert row['itm'] == pytest.approx(float(match), abs=1e-4)
    assert row['itc'] == pytest.approx(float(cosine[i, j]), abs=1e-4)
  assert len(rows) == 4


def test_gradcam_draws_each_texts_map_over_each_image(scenes, pretrained, tmp_path):
  from blip_jax.inference.heatmap import overlay
  folder, _, captions = scenes
  ckpt, model, tok = pretrained
  texts, paths = captions[:2], [folder / 'scene0.png', folder / 'scene3.png']
  rows = _run('gradcam', '--checkpoint', ckpt, '--layer', 0, '--maps', tmp_path / 'maps', '--batch-size', 4,
              '--text', texts[0], '--text', texts[1], *paths)
  assert len(rows) == 4
  embeds = model.image_embeds(_pixels(paths))
  ids, mask = tok.encode([tok.clean(t) for t in texts], 35)
  pairs = [(int(row['image'].endswith('scene3.png')), texts.index(row['text'])) for row in rows]
  images_of, texts_of = (np.asarray(p) for p in zip(*pairs))
  maps, logits = model.itm_gradcam(embeds[images_of], ids[texts_of], mask[texts_of], layer=0)  # every pair at once
  for k, (row, (i, _)) in enumerate(zip(rows, pairs)):
    assert row['itm'] == pytest.approx(float(jax.nn.softmax(logits)[k, 1]), abs=1e-4)
    photo = np.asarray(Image.open(paths[i]).convert('RGB'))
    drawn = np.asarray(Image.open(row['map']), np.int32)
    assert drawn.shape == photo.shape
    assert np.abs(drawn - np.asarray(overlay(photo, maps[k, 1]), np.int32)).max() <= 1  # the words' mean map
    assert np.abs(drawn - photo).max() > 30  # it is drawn
  assert len({r['map'] for r in rows}) == 4


def test_an_overlay_leaves_the_photo_where_the_map_is_lowest():
  import matplotlib

  from blip_jax.inference.heatmap import overlay
  photo = np.full((8, 8, 3), 100, np.uint8)
  cam = np.zeros((2, 2), np.float32)
  cam[0, 0] = 1.0
  drawn = np.asarray(overlay(photo, cam, alpha=0.5), np.int32)
  assert (drawn[6:, 6:] == 100).all()  # the far corner: map 0
  red = np.asarray(matplotlib.colormaps['jet'](1.0)[:3]) * 255  # the map's top colour
  np.testing.assert_allclose(drawn[0, 0], 0.5 * 100 + 0.5 * red, atol=1)


def test_retrieve_builds_an_index_and_answers_text_and_image_queries(scenes, pretrained, tmp_path):
  folder, _, captions = scenes
  ckpt, model, tok = pretrained
  index = tmp_path / 'index'
  _run('retrieve', '--checkpoint', ckpt, '--index', index, folder)
  rows = _run('retrieve', '--checkpoint', ckpt, '--index', index, '--query', captions[2], '--top', 3,
              '--image-query', folder / 'scene4.png')
  paths = sorted(str(p.resolve()) for p in folder.glob('*.png'))
  feats = np.asarray(model.image_features(model.image_embeds(_pixels(paths))))
  ids, mask = tok.encode([tok.clean(captions[2])], 35)
  query = np.asarray(model.text_features(model.text_embeds(ids, mask)))[0]
  order = np.argsort(-(feats @ query))[:3]
  text_rows = [r for r in rows if r['query'] == captions[2]]
  assert [r['image'] for r in text_rows] == [paths[i] for i in order]
  assert [r['score'] for r in text_rows] == pytest.approx((feats @ query)[order], abs=1e-4)
  image_rows = [r for r in rows if r['query'] != captions[2]]
  assert image_rows[0]['image'].endswith('scene4.png') and image_rows[0]['score'] == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope='module')
def vqa_model(scenes, tmp_path_factory):
  return _tiny_blip(scenes, tmp_path_factory, 'vqa', seed=5)


def test_vqa_ranks_a_list_and_generates_as_the_original_or_with_the_question_mask(scenes, vqa_model, tmp_path):
  folder, _, _ = scenes
  ckpt, model, tok = vqa_model
  answers = ['red', 'blue', 'two', 'yes', 'no']
  (tmp_path / 'answers.txt').write_text('\n'.join(answers))
  question = 'what color is the circle?'
  images = [folder / 'scene1.png', folder / 'scene2.png']
  ranked = _run('vqa', '--checkpoint', ckpt, '--question', question, '--answers', tmp_path / 'answers.txt', *images)
  embeds = model.image_embeds(_pixels(images))
  q_ids, q_mask = tok.encode([question.rstrip('?')] * 2, 35, 'enc')
  states = model.question_states(embeds, q_ids, q_mask)
  a_ids, a_mask = tok.encode(answers, 12, 'dec')
  scores = np.asarray(model.answer_scores(states, q_mask, a_ids, a_mask))
  assert [r['answer'] for r in ranked] == [answers[i] for i in scores.argmax(-1)]  # k_test 128 >= 5: all scored
  top2 = _run('vqa', '--checkpoint', ckpt, '--question', question, '--answers', tmp_path / 'answers.txt',
              '--k-test', 2, *images)
  picked = np.asarray(model.rank_answers(states, q_mask, a_ids, a_mask, k=2))
  assert [r['answer'] for r in top2] == [answers[i] for i in picked]

  def beam(question_states):
    ids = generate.beam_search(model.text_decoder, question_states, np.full((2, 1), tok.bos_token_id, np.int32),
                               num_beams=3, max_length=10, min_length=1, eos_token_id=tok.sep_token_id,
                               pad_token_id=tok.pad_token_id)[0][:, 0]
    return [t.strip() for t in tok.decode(ids)]

  # As the original: the padded question positions are attended (no mask at all).
  generated = _run('vqa', '--checkpoint', ckpt, '--question', question, *images)
  assert [r['answer'] for r in generated] == beam(states)
  # Masked: the same answers as from the unpadded question.
  masked = _run('vqa', '--checkpoint', ckpt, '--question', question, '--mask-question-padding', *images)
  length = int(q_mask[0].sum())
  assert [r['answer'] for r in masked] == beam(model.question_states(embeds, q_ids[:, :length], q_mask[:, :length]))


def test_a_predictor_answers_each_call_with_its_own_texts(scenes, vqa_model, pretrained):
  """Compiled functions are cached by name: texts must be arguments, not baked-in constants, for
  calls of the same shapes (a stale answer list picks the other answer) and of new ones."""
  folder, _, _ = scenes
  images = [folder / 'scene1.png']
  used = blip_jax.Predictor.from_pretrained(vqa_model[0])
  for questions, answers in [(['what color is the circle?'], ['red', 'blue']),
                             (['what color is the circle?'], ['blue', 'red']),
                             (['how many objects are there?', 'is it left?'], ['blue', 'red', 'two'])]:
    fresh = blip_jax.Predictor.from_pretrained(vqa_model[0])
    assert used.vqa(images, questions, answers=answers) == fresh.vqa(images, questions, answers=answers)
    assert used.vqa(images, questions) == fresh.vqa(images, questions)
  used = blip_jax.Predictor.from_pretrained(pretrained[0])
  for texts, prompt in [(['a red circle', 'a blue square'], 'a picture of '), (['a blue square', 'a red circle',
                                                                                   'two objects'], 'a photo of ')]:
    fresh = blip_jax.Predictor.from_pretrained(pretrained[0])
    for key in ('itm', 'itc'):
      np.testing.assert_allclose(used.itm(images, texts)[key], fresh.itm(images, texts)[key], atol=1e-6)
    assert used.caption(images, prompt=prompt, num_beams=1) == fresh.caption(images, prompt=prompt, num_beams=1)


@pytest.mark.parametrize('family', ['blip', 'clip'])
def test_classify_zero_shot(scenes, pretrained, tmp_path_factory, family):
  folder, vocab, _ = scenes
  classes, templates = ['red circle', 'blue square', 'green triangle'], ['a picture of a {}.', 'a {} shape']
  tok = BlipTokenizer(vocab, with_enc=family == 'blip')
  if family == 'blip':
    ckpt, model, _ = pretrained
  else:  # a CLIP trained by train.py: BLIP's WordPiece tokenizer, pooled at [SEP]
    config = clip.clip_config('ViT-B/32', vision=dict(width=32, depth=2, num_heads=2, mlp_dim=48, patch_size=8,
                                                      image_size=SIZE),
                              text=dict(width=16, num_layers=2, num_heads=2, vocab_size=tok.vocab_size,
                                        context_length=20, eos_token_id=tok.sep_token_id), embed_dim=16)
    model = registry.build('clip', 'contrastive', config, seed=2)
    ckpt = _save(tmp_path_factory, 'clip', model, config, 'contrastive', tok)
  argv = ['classify', '--checkpoint', ckpt, '--classes', ','.join(classes), '--top', 2, folder]
  rows = _run(*argv[:-1], '--template', templates[0], '--template', templates[1], folder)
  paths = sorted(str(p) for p in folder.glob('*.png'))
  prompts = [tok.clean(t.format(c)) for c in classes for t in templates]
  if family == 'blip':
    ids, mask = tok.encode(prompts, 35)
    text = model.text_features(model.text_embeds(ids, mask))
    image = model.image_features(model.image_embeds(_pixels(paths)))
    scale = 1 / model.temperature()
  else:
    ids, mask = tok.encode(prompts, 20)
    norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    text, image = norm(model.embed_text(ids, mask)), norm(model.embed_image(_pixels(paths, 'clip_eval')))
    scale = jnp.exp(model.logit_scale[...])
  classifier = text.reshape(3, 2, -1).mean(1)
  classifier = classifier / jnp.linalg.norm(classifier, axis=-1, keepdims=True)
  probs = np.asarray(jax.nn.softmax(scale * image @ classifier.T, -1))
  for row, p in zip(rows, probs):
    top = np.argsort(-p)[:2]
    assert [row['top1'], row['top2']] == [classes[i] for i in top]
    assert [row['p1'], row['p2']] == pytest.approx(p[top], abs=1e-4)


def _blip2_config(**kw):
  from blip_jax.models import qformer, vit
  return blip2.Blip2Config(
      vision=vit.vit_config('eva_g', image_size=SIZE, width=32, depth=2, num_heads=2, mlp_dim=48, patch_size=8),
      qformer=qformer.QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, encoder_width=32,
                                    num_query_tokens=4, **kw.pop('qformer', {})), embed_dim=16, **kw)


@pytest.fixture(scope='module')
def blip2_stage1(scenes, tmp_path_factory):
  """A random tiny BLIP-2 stage 1 (its tokenizer: BERT WordPiece with [DEC] only)."""
  tok = BlipTokenizer(scenes[1], with_enc=False)
  config = _blip2_config(qformer=dict(vocab_size=tok.vocab_size), bos_token_id=tok.bos_token_id,
                         sep_token_id=tok.sep_token_id)
  model = registry.build('blip2', 'stage1', config, seed=4)
  return _save(tmp_path_factory, 'blip2', model, config, 'stage1', tok), model, tok


def test_blip2_stage1_caption_itm_retrieve_classify(scenes, blip2_stage1, tmp_path):
  folder, _, captions = scenes
  ckpt, model, tok = blip2_stage1
  paths = sorted(str(p) for p in folder.glob('*.png'))
  embeds = model.image_embeds(_pixels(paths))
  # caption: the Q-Former's ITG decoder from [DEC] (LAVIS uses no prompt), greedy
  rows = _run('caption', '--checkpoint', ckpt, '--beams', 1, '--max-length', 8, '--min-length', 3, folder)
  ids = generate.greedy(model.decoder, embeds, np.full((6, 1), tok.bos_token_id, np.int32), max_length=8,
                        min_length=3, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
  assert [r['caption'] for r in rows] == [t.strip() for t in tok.decode(ids)]
  # itm and itc: ITM averaged over the queries, ITC the best query
  texts = captions[:2]
  rows = _run('itm', '--checkpoint', ckpt, '--text', texts[0], '--text', texts[1], *paths[:2])
  t_ids, t_mask = tok.encode([tok.clean(t) for t in texts], 32)
  feats, text = model.image_features(embeds[:2]), model.text_features(t_ids, t_mask)
  for row in rows:
    i, j = paths.index(row['image']), texts.index(row['text'])
    match = jax.nn.softmax(model.itm_logits(embeds[i:i + 1], t_ids[j:j + 1], t_mask[j:j + 1]))[0, 1]
    assert row['itm'] == pytest.approx(float(match), abs=1e-4)
    assert row['itc'] == pytest.approx(float(np.max(np.asarray(feats[i]) @ np.asarray(text[j]))), abs=1e-4)
  # retrieve: images ranked by their best query's cosine with the text
  index = tmp_path / 'index'
  _run('retrieve', '--checkpoint', ckpt, '--index', index, folder)
  rows = _run('retrieve', '--checkpoint', ckpt, '--index', index, '--query', captions[2], '--top', 6)
  q_ids, q_mask = tok.encode([tok.clean(captions[2])], 32)
  scores = (np.asarray(model.image_features(embeds)) @ np.asarray(model.text_features(q_ids, q_mask))[0]).max(1)
  assert [r['image'] for r in rows] == [str(pathlib.Path(paths[i]).resolve()) for i in np.argsort(-scores)]
  # classify: prompt-ensembled classes, best query, scaled by 1 / temp
  classes = ['red circle', 'blue square', 'green triangle']
  rows = _run('classify', '--checkpoint', ckpt, '--classes', ','.join(classes), '--top', 3, *paths)
  c_ids, c_mask = tok.encode([tok.clean(f'a picture of a {c}.') for c in classes], 32)
  classifier = np.asarray(model.text_features(c_ids, c_mask))
  probs = jax.nn.softmax((np.asarray(model.image_features(embeds)) @ classifier.T).max(1) / model.temp[...], -1)
  assert [r['p1'] for r in rows] == pytest.approx(np.sort(np.asarray(probs), -1)[:, ::-1][:, 0], abs=1e-4)
  assert [r['top1'] for r in rows] == [classes[i] for i in np.asarray(probs).argmax(-1)]


def _opt_tokenizer(texts, folder):
  """A byte-level BPE tokenizer in OPT's conventions (`</s>` = 2 starts a text, `<pad>` = 1), trained
  offline on `texts`: what `--tokenizer` points at (the real one is facebook/opt-*'s)."""
  import tokenizers
  import transformers
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(texts, vocab_size=300, special_tokens=['<s>', '<pad>', '</s>', '<unk>'])
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token='</s>', eos_token='</s>',
                                             pad_token='<pad>', unk_token='<unk>')
  tok.save_pretrained(folder)
  return tok


def test_blip2_opt_caption(scenes, tmp_path_factory):
  from blip_jax.models import opt
  folder, _, captions = scenes
  tok_dir = tmp_path_factory.mktemp('opt_tokenizer')
  tok = _opt_tokenizer([c + '\n' for c in captions] * 5, tok_dir)
  newline = tok('\n', add_special_tokens=False)['input_ids'][0]
  # BLIP-2 checkpoints end OPT's captions at '\n' (its eos_token_id), as LAVIS generates them.
  config = _blip2_config(qformer=dict(text_input=False), opt=opt.OPTConfig(
      vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2, ffn_dim=48, max_position_embeddings=40,
      eos_token_id=newline))
  model = registry.build('blip2', 'stage2', config, seed=6)
  ckpt = tmp_path_factory.mktemp('blip2_opt') / 'model'
  model_io.save(ckpt, model, config, task='stage2')
  missing = predict.main(['caption', '--checkpoint', str(ckpt), str(folder)])
  assert missing == 2  # no tokenizer: a clear error, not a crash
  model_io.save(ckpt, model, config, task='stage2', tokenizer=HFTokenizer(tok_dir))  # the directory carries it
  paths = sorted(str(p) for p in folder.glob('*.png'))
  rows = _run('caption', '--checkpoint', ckpt, '--prompt', 'a', '--beams', 2, '--max-length', 7, '--min-length', 2,
              folder)
  prompt = [2, *tok('a', add_special_tokens=False)['input_ids']]
  embeds = model.image_embeds(_pixels(paths))
  ids = generate.beam_search(model.decoder, model.prefix(embeds), np.asarray([prompt] * 6), num_beams=2, max_length=7,
                             min_length=2, eos_token_id=newline, pad_token_id=1)[0][:, 0]
  assert [r['caption'] for r in rows] == [t.strip() for t in tok.batch_decode(np.asarray(ids)[:, len(prompt):],
                                                                              skip_special_tokens=True)]
  assert all(0 < r['confidence'] <= 1 for r in rows)


def test_bad_inputs_are_reported_and_the_others_processed(scenes, pretrained, tmp_path, capsys):
  folder, _, _ = scenes
  ckpt, _, _ = pretrained
  (tmp_path / 'notes.png').write_text('not an image')
  (tmp_path / 'zero.jpg').write_bytes(b'')
  whole = (folder / 'scene1.png').read_bytes()
  (tmp_path / 'truncated.png').write_bytes(whole[:len(whole) // 2])
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'list.txt').write_text(f'{folder / "scene5.png"}\n{tmp_path / "gone.jpg"}\n')
  rows = _run('itm', '--checkpoint', ckpt, '--text', 'a red circle', '--format', 'jsonl', folder / 'scene0.png',
              tmp_path / 'missing.jpg', tmp_path / 'notes.png', tmp_path / 'zero.jpg', tmp_path / 'truncated.png',
              tmp_path / 'empty', f'@{tmp_path / "list.txt"}')
  assert [r['image'].rsplit('/', 1)[-1] for r in rows] == ['scene0.png', 'scene5.png']
  out, err = capsys.readouterr()
  assert [r['image'] for r in _jsonl(out)] == [r['image'] for r in rows]
  for name, why in (('missing.jpg', 'no such file'), ('notes.png', 'not a readable image'),
                    ('zero.jpg', 'not a readable image'), ('truncated.png', 'not a readable image'),
                    ('empty', 'folder holds no images'), ('gone.jpg', 'no such file')):
    assert any(name in line and why in line for line in err.splitlines()), (name, err)
  # Nothing readable, or the wrong kind of checkpoint: one line and exit status 2.
  assert predict.main(['caption', '--checkpoint', str(ckpt), str(tmp_path / 'empty')]) == 2
  assert 'no readable images' in capsys.readouterr().err
  assert predict.main(['caption', '--checkpoint', str(tmp_path), str(folder)]) == 2
  assert str(tmp_path) in capsys.readouterr().err


def test_every_kind_of_image_reads_as_its_documented_rgb_pixels(tmp_path, monkeypatch):
  """The pixels a dataset built from the same files stores (tests/data/test_annotations.py)."""
  import PIL.Image

  from blip_jax.inference.images import ImageError, to_rgb
  from blip_jax.testing import image_kinds
  for name, (path, expected) in image_kinds.write(tmp_path).items():
    np.testing.assert_array_equal(to_rgb(path), expected, err_msg=name)
    with PIL.Image.open(path) as im:
      np.testing.assert_array_equal(to_rgb(im), expected, err_msg=f'{name} as a PIL image')
  monkeypatch.setattr(PIL.Image, 'MAX_IMAGE_PIXELS', 50)  # refused over twice this; the files are 12 x 20
  with pytest.raises(ImageError, match=r'rgb\.png: too large to decode safely'):
    to_rgb(tmp_path / 'rgb.png')


def test_a_full_disk_is_one_error_naming_the_output_and_leaves_no_partial_shard(scenes, pretrained, tmp_path,
                                                                                 capsys):
  folder, _, _ = scenes
  ckpt, _, _ = pretrained
  out = tmp_path / 'rows.jsonl'
  out.symlink_to('/dev/full')  # the kernel's always-full device: every write is ENOSPC
  assert predict.main(['itm', '--checkpoint', str(ckpt), '--text', 'a red circle', '--format', 'jsonl',
                       '--out', str(out), str(folder / 'scene0.png')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {out}: the disk is full') and err.count('\n') == 1, err
  index = tmp_path / 'index'
  index.mkdir()
  (index / f'shard-00000.npz.tmp{os.getpid()}').symlink_to('/dev/full')
  assert predict.main(['retrieve', '--checkpoint', str(ckpt), '--index', str(index), str(folder)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'error: {index / "shard-00000.npz"}: the disk is full'), err
  assert sorted(p.name for p in index.iterdir()) == ['index.json']  # no partial shard; the next run starts clean


def test_module_runs_from_the_command_line(scenes, pretrained):
  folder, _, _ = scenes
  ckpt, _, _ = pretrained
  done = subprocess.run([sys.executable, '-m', 'blip_jax.predict', 'caption', '--checkpoint', str(ckpt), '--beams', '1',
                         '--max-length', '8', str(folder / 'scene0.png')], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]
  header, row = done.stdout.splitlines()[-2:]
  assert header.split() == ['image', 'caption', 'confidence'] and row.startswith(str(folder / 'scene0.png'))


def test_bfloat16_holds_weights_in_bf16_and_stays_close_to_float32(scenes, pretrained):
  """`dtype='bfloat16'`: every floating weight is stored in bf16 (half the memory) and the model
  computes in bf16; its scores stay within bf16's precision of the fp32 ones."""
  from blip_jax import Predictor
  folder, _, captions = scenes
  ckpt, _, _ = pretrained
  images = sorted(str(p) for p in folder.glob('*.png'))
  fp32, bf16 = Predictor.from_pretrained(ckpt), Predictor.from_pretrained(ckpt, dtype='bfloat16')
  floating = [x.dtype for x in jax.tree.leaves(bf16.state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floating and all(d == jnp.bfloat16 for d in floating)
  assert bf16.config.vision.dtype == bf16.config.text.dtype == 'bfloat16'
  a, b = fp32.itm(images, captions[:3]), bf16.itm(images, captions[:3])
  np.testing.assert_allclose(b['itm'], a['itm'], atol=3e-2)
  np.testing.assert_allclose(b['itc'], a['itc'], atol=3e-2)
  assert not np.array_equal(b['itc'], a['itc'])  # bf16 really took effect
  classes = ['red circle', 'blue square', 'green triangle']
  pa = np.asarray([[p for _, p in sorted(row)] for row in fp32.classify(images, classes, top=3)])
  pb = np.asarray([[p for _, p in sorted(row)] for row in bf16.classify(images, classes, top=3)])
  np.testing.assert_allclose(pb, pa, atol=3e-2)
