"""`Predictor.from_pretrained('ORG/NAME')` from an HF Hub cache laid out offline (what
`snapshot_download` leaves: models--ORG--NAME/snapshots/REV/... and refs/main, read with
HF_HUB_OFFLINE=1): tiny random HF models saved with `save_pretrained` beside their tokenizer
files, and every method's output equal to the HF model's own on the same pixels and tokens."""

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers

from blip_jax import Predictor
from blip_jax.testing.torch_refs import (
  BLIP2_IMAGE_TOKEN,
  BLIP2_QUERIES,
  CLS,
  ENC,
  SEP,
  build_hf,
  hf_blip2_opt,
  hf_clip,
  word_tokenizer,
  write_vocab,
)

TOL = 1e-5


@pytest.fixture
def hub(tmp_path, monkeypatch):
  """An empty HF cache; `hub(name, save)` publishes a repository into it (`save(folder)` writes
  the files, as `save_pretrained` does into a snapshot)."""
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))

  def publish(name, save):
    repo = tmp_path / 'hub' / f'models--{name.replace("/", "--")}'
    snapshot = repo / 'snapshots' / '0123abcd'
    snapshot.mkdir(parents=True)
    save(snapshot)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text('0123abcd')
    return name

  return publish


def _images(size, n=2, seed=0):
  """uint8 images of another size than the model's (the predictor resizes them)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (size + 7 * i + 5, size + 3, 3), dtype=np.uint8) for i in range(n)]


def _pixels(p, images):
  """The predictor's preprocessed images as the PyTorch models take them (NCHW)."""
  return torch.from_numpy(p.preprocess(images)).permute(0, 3, 1, 2)


def test_not_in_the_cache_is_a_clear_error(hub):
  with pytest.raises(FileNotFoundError, match='Salesforce/blip-nothing: not found in the HF cache'):
    Predictor.from_pretrained('Salesforce/blip-nothing')


def test_blip_caption_equals_hf_generate(hub):
  hf = build_hf(transformers.BlipForConditionalGeneration)
  with torch.no_grad():  # LayerNorm gains near 1: tokens that depend on the image and prompt
    for module in hf.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.add_(1.0)
  name = hub('Salesforce/blip-tiny-captioning', lambda d: (hf.save_pretrained(d), write_vocab(d / 'vocab.txt')))
  p = Predictor.from_pretrained(name, enc_token_id=ENC)  # a tiny vocabulary's [ENC] (BLIP's is 30523)
  images = _images(32)
  for beams in (1, 3):
    captions = p.caption(images, num_beams=beams, max_length=12, min_length=5, prompt='a picture of ')
    prompt = p.tokenizer.encode(['a picture of '], 8)[0][:, :4]  # [CLS] a picture of, as HF's processor makes it
    with torch.no_grad():
      ref = hf.generate(pixel_values=_pixels(p, images), input_ids=torch.tensor(np.c_[prompt, [[SEP]]]).repeat(2, 1),
                        max_length=12, min_length=5, num_beams=beams, do_sample=False)
    assert captions == [t[len('a picture of'):].strip() for t in p.tokenizer.decode(ref.numpy())], beams


def test_blip_itm_equals_hf_retrieval_heads(hub):
  hf = build_hf(transformers.BlipForImageTextRetrieval)
  name = hub('Salesforce/blip-tiny-itm', lambda d: (hf.save_pretrained(d), write_vocab(d / 'vocab.txt')))
  p = Predictor.from_pretrained(name, enc_token_id=ENC)
  images, texts = _images(32), ['a dog on the beach', 'a cat']
  scores = p.itm(images, texts)
  ids, mask = p.tokenize(texts)
  x = _pixels(p, images)
  for i in range(2):
    for j in range(2):
      with torch.no_grad():
        enc_ids = torch.tensor(ids[j:j + 1]).clone()
        enc_ids[:, 0] = ENC  # HF reads the ids as given; BLIP's ITM puts [ENC] first
        itm = hf(input_ids=enc_ids, pixel_values=x[i:i + 1], attention_mask=torch.tensor(mask[j:j + 1]),
                 use_itm_head=True).itm_score.softmax(-1)[0, 1]
        itc = hf(input_ids=torch.tensor(ids[j:j + 1]), pixel_values=x[i:i + 1], attention_mask=torch.tensor(mask[j:j + 1]),
                 use_itm_head=False).itm_score[0, 0]
      np.testing.assert_allclose(scores['itm'][i, j], float(itm), atol=TOL)
      np.testing.assert_allclose(scores['itc'][i, j], float(itc), atol=TOL)
  assert ids[0, 0] == CLS


OPT_WORDS = ['<s>', '<pad>', '</s>', '<unk>', '\n', 'Question:', 'what', 'is', 'it?', 'Short', 'answer:', 'a', 'cat',
             'dog', 'red', 'two']


def test_blip2_opt_vqa_equals_hf_generate(hub):
  hf = hf_blip2_opt()
  newline = OPT_WORDS.index('\n')
  hf.config.text_config.eos_token_id = newline  # HF's BLIP-2 checkpoints end OPT's text at '\n', as LAVIS
  name = hub('Salesforce/blip2-tiny-opt', lambda d: (
      hf.save_pretrained(d), word_tokenizer(OPT_WORDS, d, bos='</s>', eos='</s>', pad='<pad>')))
  p = Predictor.from_pretrained(name)
  images = _images(28, n=3)
  answers = p.vqa(images, ['what is it?'])
  prompt = p.tokenizer.decoder_prompt('Question: what is it? Short answer:')
  assert prompt.shape[1] == 7  # BOS and six words: the template's words are in this vocabulary
  with torch.no_grad():
    ref = hf.generate(pixel_values=_pixels(p, images),
                      input_ids=torch.tensor([[BLIP2_IMAGE_TOKEN] * BLIP2_QUERIES + prompt[0].tolist()] * 3),
                      num_beams=5, max_new_tokens=10, length_penalty=-1.0, eos_token_id=newline, do_sample=False)
  expected = [t.strip() for t in p.tokenizer.decode(ref[:, BLIP2_QUERIES + prompt.shape[1]:].numpy())]
  assert [row[0] for row in answers] == expected


CLIP_WORDS = ['<|startoftext|>', '<pad>', '<|endoftext|>', '<unk>', 'a', 'picture', 'of', 'cat.', 'dog.', 'car.',
              'photo']


def test_clip_classify_equals_hf_clip(hub):
  hf = hf_clip('quick_gelu', eos_token_id=2)
  name = hub('openai/clip-tiny', lambda d: (
      hf.save_pretrained(d), word_tokenizer(CLIP_WORDS, d, bos='<|startoftext|>', eos='<|endoftext|>', pad='<pad>')))
  p = Predictor.from_pretrained(name)
  images, classes, templates = _images(32), ['cat', 'dog', 'car'], ['a picture of {}.', 'a photo of {}.']
  top = p.classify(images, classes, templates=templates, top=3)
  ids, mask = p.tokenize([t.format(c) for c in classes for t in templates])
  with torch.no_grad():
    text = hf.get_text_features(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask))
    image = hf.get_image_features(pixel_values=_pixels(p, images))
  text = getattr(text, 'pooler_output', text)
  image = getattr(image, 'pooler_output', image)
  norm = lambda x: x / x.norm(dim=-1, keepdim=True)
  weights = norm(norm(text).reshape(3, 2, -1).mean(1))
  probs = (hf.logit_scale.exp() * norm(image) @ weights.T).softmax(-1).detach().numpy()
  for row, expected in zip(top, probs):
    order = np.argsort(-expected)
    assert [c for c, _ in row] == [classes[i] for i in order]
    np.testing.assert_allclose([prob for _, prob in row], expected[order], atol=TOL)
