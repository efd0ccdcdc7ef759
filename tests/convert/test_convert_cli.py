"""convert_torch_weights.py end to end: files written by PyTorch -> CLI -> blip_jax.load."""

import contextlib
import io
import json
import pathlib
import subprocess
import sys
import types

import pytest
import torch
import transformers

import blip_jax
from blip_jax.convert_cli import main
from blip_jax.testing.torch_refs import (
  OVERRIDES,
  OpenAICLIP,
  assert_close,
  build_hf,
  eva_checkpoint,
  hf_blip2_opt,
  hf_chinese_clip,
  hf_clip,
  hf_opt,
  images,
  nhwc,
  randomize,
  text_batch,
  to_lavis,
  to_salesforce,
  write_vocab,
)

ROOT = pathlib.Path(__file__).parents[2]
BLIP_HEADS = json.dumps({k: OVERRIDES[k] for k in ('vision', 'text', 'bos_token_id', 'enc_token_id',
                                                     'sep_token_id')})


def run_subprocess(*args):
  """The CLI in a subprocess, as a user runs it."""
  return subprocess.run([sys.executable, str(ROOT / 'convert_torch_weights.py'), *map(str, args)],
                        capture_output=True, text=True, cwd=ROOT)


def run_cli(*args):
  """The CLI's `main` in this process (what the subprocess runs, without starting Python again)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main([str(a) for a in args])
  return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope='module')
def hf_caption():
  return build_hf(transformers.BlipForConditionalGeneration)


@pytest.fixture(scope='module')
def vocab(tmp_path_factory):
  return write_vocab(tmp_path_factory.mktemp('vocab') / 'vocab.txt')


def test_salesforce_pth_to_directory(tmp_path, hf_caption, vocab):
  pth = tmp_path / 'model_base_caption.pth'
  torch.save({'model': to_salesforce(hf_caption.state_dict())}, pth)
  out = tmp_path / 'converted'
  result = run_subprocess(pth, '--out', out, '--override', BLIP_HEADS, '--tokenizer', vocab)
  assert result.returncode == 0, result.stderr
  assert 'detected: blip caption (salesforce layout)' in result.stdout
  config = json.loads((out / 'config.json').read_text())
  assert config['provenance']['sources'][0]['sha256'] and config['task'] == 'caption'
  model, cfg = blip_jax.load(out)
  x = images()
  ids, mask = text_batch(first_token=97)
  with torch.no_grad():
    ref = hf_caption(pixel_values=x, input_ids=ids, attention_mask=mask).logits
  assert_close(model(model.image_embeds(nhwc(x)), ids.numpy(), mask.numpy()), ref, 'decoder logits')
  # Running the same conversion again is allowed; another checkpoint into the same --out is not.
  assert main([str(pth), '--out', str(out), '--override', BLIP_HEADS, '--tokenizer', vocab]) == 0
  other = tmp_path / 'other.pth'
  torch.save({'model': to_salesforce(build_hf(transformers.BlipForConditionalGeneration, seed=1).state_dict())}, other)
  assert main([str(other), '--out', str(out), '--override', BLIP_HEADS]) == 2
  assert blip_jax.model_io.read_config(out)['provenance']['sources'][0]['path'] == str(pth)
  assert main([str(other), '--out', str(out), '--override', BLIP_HEADS, '--force']) == 0
  assert blip_jax.model_io.read_config(out)['provenance']['sources'][0]['path'] == str(other)


def test_openai_torchscript_and_bfloat16(tmp_path):
  torch.manual_seed(0)
  ref = randomize(OpenAICLIP().eval())
  x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
  text = torch.tensor([[1, 5, 9, 39, 0, 0, 0, 0], [1, 4, 7, 6, 8, 39, 0, 0]])
  archive = tmp_path / 'ViT-tiny.pt'
  torch.jit.trace(ref, (x, text)).save(archive)
  with torch.no_grad():
    expected = ref(x, text)
  heads = json.dumps({'vision': {'num_heads': 2}, 'text': {'num_heads': 2}})
  for dtype, atol in (('float32', 1e-5), ('bfloat16', 0.3)):
    out = tmp_path / dtype
    result = run_cli(archive, '--out', out, '--override', heads, '--dtype', dtype)
    assert result.returncode == 0, result.stderr
    assert 'detected: clip contrastive (openai layout)' in result.stdout
    model, cfg = blip_jax.load(out)
    assert cfg.vision.act == 'quick_gelu'
    assert_close(model(nhwc(x), text.numpy()), expected, f'logits from {dtype} weights', atol=atol)


def test_errors_are_one_clear_line(tmp_path, capsys, hf_caption):
  truncated = tmp_path / 'truncated.pth'
  torch.save({'model': to_salesforce(hf_caption.state_dict())}, truncated)
  truncated.write_bytes(truncated.read_bytes()[:5000])
  cases = [
      ([str(truncated)], 'could not read the PyTorch checkpoint'),
      ([str(tmp_path / 'missing.pth')], 'checkpoint not found'),
  ]
  weird = tmp_path / 'weird.pth'
  torch.save({'encoder.weight': torch.zeros(2, 2)}, weird)
  cases.append(([str(weird)], 'recognised layouts: BLIP-2'))
  bad_shape = tmp_path / 'bad_shape.pth'
  sd = to_salesforce(hf_caption.state_dict())
  sd['text_decoder.bert.encoder.layer.0.output.dense.weight'] = torch.zeros(24, 36)
  torch.save(sd, bad_shape)
  cases.append(([str(bad_shape), '--override', BLIP_HEADS], 'shape mismatch'))
  (tmp_path / 'random.pth').write_bytes(bytes(range(256)) * 20)
  cases.append(([str(tmp_path / 'random.pth')], 'random.pth: could not read the PyTorch checkpoint: not a PyTorch '
                                                'file, or its pickle holds objects other than tensors'))
  (tmp_path / 'random.safetensors').write_bytes(bytes(range(256)) * 20)
  cases.append(([str(tmp_path / 'random.safetensors')], 'random.safetensors: could not read the safetensors file'))
  for name in ('empty.pth', 'empty.bin', 'empty.safetensors'):
    (tmp_path / name).write_bytes(b'')
    cases.append(([str(tmp_path / name)], f'{name}: the file is empty (0 bytes), not a checkpoint'))
  good = tmp_path / 'blip.pth'
  torch.save(to_salesforce(hf_caption.state_dict()), good)
  cases.append(([str(good), '--family', 'clip'], 'blip.pth: not a CLIP checkpoint: expected'))
  cases.append(([str(good), '--family', 'blip2'], 'blip.pth: not a BLIP-2 checkpoint: expected'))
  nan = to_salesforce(hf_caption.state_dict())
  nan['text_decoder.bert.encoder.layer.0.output.dense.weight'][0, 0] = float('nan')
  nan['visual_encoder.pos_embed'][0, 0, 0] = float('inf')
  torch.save(nan, tmp_path / 'nan.pth')
  cases.append(([str(tmp_path / 'nan.pth'), '--override', BLIP_HEADS],
                'nan.pth: weights hold NaN or Inf: text_decoder.bert.encoder.layer.0.output.dense.kernel, '
                'visual_encoder.pos_embed; the checkpoint is damaged'))
  occupied = tmp_path / 'occupied'
  occupied.mkdir()
  (occupied / 'notes.txt').write_text('mine')
  cases.append(([str(weird), '--out', str(occupied)], 'not a blip_jax checkpoint'))
  for args, message in cases:
    if '--out' not in args:
      args = args + ['--out', str(tmp_path / 'out')]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err, err
  assert (occupied / 'notes.txt').read_text() == 'mine'  # nothing overwritten
  result = run_cli(truncated, '--out', tmp_path / 'x')
  assert result.returncode == 2 and 'Traceback' not in result.stderr


def _failing_orbax_save(self, directory, *args, **kwargs):
  """What orbax does when the disk fills mid-write: some files written, then tensorstore's error."""
  pathlib.Path(directory).mkdir(parents=True)
  (pathlib.Path(directory) / 'half_written').write_bytes(b'x' * 100)
  raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{directory}/d/0": No space left on device')


def test_a_full_or_read_only_disk_is_one_error_and_the_previous_output_stays(tmp_path, capsys, hf_caption,
                                                                             monkeypatch):
  import collections
  import os
  import shutil

  import orbax.checkpoint as ocp

  from blip_jax import model_io
  ckpt, out = tmp_path / 'blip.pth', tmp_path / 'out'
  torch.save(to_salesforce(hf_caption.state_dict()), ckpt)
  args = [str(ckpt), '--out', str(out), '--override', BLIP_HEADS]
  assert main(args) == 0
  capsys.readouterr()
  before = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}
  access = os.access
  full = lambda path: collections.namedtuple('usage', 'total used free')(10**9, 10**9 - 1000, 1000)
  read_only = lambda path, mode: False if str(path).startswith(str(tmp_path)) else access(path, mode)
  cases = {
      'too little space': (('shutil', 'disk_usage', full), f'{out}: not enough space: 1000 bytes free there; about '),
      'full mid-write': ((ocp.StandardCheckpointer, 'save', _failing_orbax_save), f'{out}: the disk is full'),
      'read-only': (('os', 'access', read_only), f'{out}: cannot write there'),
  }
  for case, ((target, name, fake), message) in cases.items():
    with monkeypatch.context() as m:
      m.setattr({'shutil': shutil, 'os': os}.get(target, target), name, fake)
      assert main(args) == 2, case
    err = capsys.readouterr().err
    assert err.startswith(f'error: {message}') and err.count('\n') == 1, (case, err)
    assert not os.path.exists(str(out) + model_io.PARTIAL_SUFFIX), case  # nothing half written left
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()} == before, case


def _edit_config(d, fields):
  """config.json with `fields` (a dict, or a function of the old config.json giving one) replaced."""
  meta = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps({**meta, **(fields(meta) if callable(fields) else fields)}))


def _files(d):
  return [p for p in (d / 'weights').rglob('*') if p.is_file() and p.stat().st_size > 1000]


DAMAGED_DIRS = {  # damage -> what the one-line error says
    'config.json garbage': (lambda d: (d / 'config.json').write_text('{"format": tru'),
                            r'config\.json: not valid JSON .*the directory is damaged'),
    'config.json empty': (lambda d: (d / 'config.json').write_text(''), r'config\.json: not valid JSON'),
    'another family': (lambda d: _edit_config(d, {'family': 'llama'}), r"config\.json: unknown model family 'llama'"),
    'another shape': (lambda d: _edit_config(d, lambda meta: {'config': {
        **meta['config'], 'vision': {**meta['config']['vision'], 'mlp_dim': 40}}}),
                      r'weights: cannot be restored into the model config\.json describes .*shape'),
    'truncated weights': (lambda d: [p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]) for p in _files(d)],
                          r'weights: cannot be restored into the model config\.json describes \(damaged'),
    'random weights': (lambda d: [p.write_bytes(bytes(range(256)) * (p.stat().st_size // 256)) for p in _files(d)],
                       r'weights: cannot be restored'),
    'weights deleted': (lambda d: __import__('shutil').rmtree(d / 'weights'), r'weights: cannot be restored'),
}


@pytest.mark.parametrize('damage', DAMAGED_DIRS)
def test_a_damaged_converted_directory_is_one_clear_error(damage, tmp_path, capsys, hf_caption):
  import shutil

  from blip_jax import predict
  good = tmp_path / 'good'
  torch.save(to_salesforce(hf_caption.state_dict()), tmp_path / 'blip.pth')
  assert main([str(tmp_path / 'blip.pth'), '--out', str(good), '--override', BLIP_HEADS]) == 0
  model_dir = tmp_path / 'damaged'
  shutil.copytree(good, model_dir)
  change, message = DAMAGED_DIRS[damage]
  change(model_dir)
  with pytest.raises(ValueError, match=message):
    blip_jax.load(str(model_dir))
  from PIL import Image
  Image.new('RGB', (16, 16)).save(tmp_path / 'x.png')
  capsys.readouterr()
  assert predict.main(['caption', '--checkpoint', str(model_dir), str(tmp_path / 'x.png')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and str(model_dir) in err, err


def test_a_converted_directory_holding_nan_is_refused(tmp_path, hf_caption):
  from blip_jax import model_io
  model, config, _ = blip_jax.convert.load_torch(hf_caption.state_dict(), **OVERRIDES)
  var = model.visual_encoder.pos_embed
  var.set_value(var.get_value().at[0, 0, 0].set(float('nan')))
  model_io.save(tmp_path / 'nan', model, config, task='caption')
  with pytest.raises(ValueError, match=r'nan/weights: weights hold NaN or Inf: visual_encoder\.pos_embed; the checkpoint'):
    blip_jax.load(str(tmp_path / 'nan'))


def test_load_converts_pytorch_sources_in_memory(hf_caption):
  model, cfg = blip_jax.load(hf_caption.state_dict(), **OVERRIDES)
  x = images()
  with torch.no_grad():
    ref = hf_caption.vision_model(x).last_hidden_state
  assert_close(model.image_embeds(nhwc(x)), ref, 'vision states')


# ----------------------------------------------------------------------------------------------
# Every other layout: written by PyTorch, converted by the CLI, loaded, compared.

def _getattr_output(out):
  return getattr(out, 'pooler_output', out)


def _case_blip_hf_folder(tmp):
  hf = build_hf(transformers.BlipForImageTextRetrieval)
  hf.save_pretrained(tmp / 'src')
  x = images()
  with torch.no_grad():
    ref = hf.vision_model(x).last_hidden_state
  return [tmp / 'src'], [], lambda m: assert_close(m.image_embeds(nhwc(x)), ref, 'BLIP vision states')


def _case_clip_hf_folder(tmp):
  hf = hf_clip('gelu', 7)
  hf.save_pretrained(tmp / 'src')
  x = images()
  with torch.no_grad():
    ref = _getattr_output(hf.get_image_features(pixel_values=x))
  return [tmp / 'src'], [], lambda m: assert_close(m.embed_image(nhwc(x)), ref, 'CLIP image features')


def _open_clip_case(tmp, filename, save):
  torch.manual_seed(0)
  ref_model = randomize(OpenAICLIP().eval())
  # open_clip training checkpoints: {'state_dict': {'module.' + key: tensor}}
  save({f'module.{k}': v.contiguous() for k, v in ref_model.state_dict().items()}, tmp / filename)
  text = torch.tensor([[1, 5, 9, 39, 0, 0, 0, 0], [1, 4, 7, 6, 8, 39, 0, 0]])
  with torch.no_grad():
    ref = ref_model.encode_text(text)
  args = ['--act', 'quick_gelu', '--override', json.dumps({'vision': {'num_heads': 2}, 'text': {'num_heads': 2}})]
  return [tmp / filename], args, lambda m: assert_close(m.embed_text(text.numpy()), ref, 'CLIP text features')


def _case_open_clip_bin(tmp):
  return _open_clip_case(tmp, 'open_clip_pytorch_model.bin', lambda sd, p: torch.save({'state_dict': sd}, p))


def _case_open_clip_safetensors(tmp):
  import safetensors.torch
  return _open_clip_case(tmp, 'open_clip_model.safetensors', safetensors.torch.save_file)


def _case_chinese_clip_folder(tmp):
  hf = hf_chinese_clip()
  hf.save_pretrained(tmp / 'src')
  ids = torch.tensor([[2, 11, 12, 13, 3], [2, 14, 3, 0, 0]])
  with torch.no_grad():
    ref = _getattr_output(hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()))
  return [tmp / 'src'], [], lambda m: assert_close(m.embed_text(ids.numpy(), (ids != 0).numpy()), ref,
                                                   'Chinese-CLIP text features')


def _case_blip2_hf_folder(tmp):
  hf = hf_blip2_opt()
  hf.save_pretrained(tmp / 'src')
  x = images(size=28)
  with torch.no_grad():
    vision = hf.vision_model(x).last_hidden_state
    ref = hf.qformer(query_embeds=hf.query_tokens.expand(2, -1, -1), encoder_hidden_states=vision).last_hidden_state
  return [tmp / 'src'], [], lambda m: assert_close(m.query_states(m.image_embeds(nhwc(x))), ref,
                                                   'BLIP-2 query outputs')


def _case_opt_hf_folder(tmp):
  hf = hf_opt()
  hf.save_pretrained(tmp / 'src')
  ids = torch.tensor([[2, 10, 11, 12]])
  with torch.no_grad():
    ref = hf(input_ids=ids).logits
  return [tmp / 'src'], [], lambda m: assert_close(m(ids.numpy()), ref, 'OPT logits')


@pytest.mark.parametrize('case', [_case_blip_hf_folder, _case_clip_hf_folder, _case_open_clip_bin,
                                  _case_open_clip_safetensors, _case_chinese_clip_folder,
                                  _case_blip2_hf_folder, _case_opt_hf_folder],
                         ids=lambda f: f.__name__[len('_case_'):])
def test_layout_through_the_cli(tmp_path, case):
  sources, args, check = case(tmp_path)
  result = run_cli(*sources, '--out', tmp_path / 'out', *args)
  assert result.returncode == 0, result.stderr
  model, _ = blip_jax.load(tmp_path / 'out')
  check(model)


def test_lavis_blip2_from_three_sources_through_the_cli(tmp_path):
  hf = hf_blip2_opt()
  sd = hf.state_dict()
  torch.save({'model': to_lavis(sd)}, tmp_path / 'blip2_opt.pth')
  torch.save(eva_checkpoint(sd), tmp_path / 'eva_vit_g.pth')
  hf.language_model.save_pretrained(tmp_path / 'opt')
  heads = json.dumps({'vision': {'num_heads': 2, 'ln_eps': 1e-6}, 'qformer': {'num_heads': 2},
                      'ln_vision_eps': 1e-6})
  missing = run_cli(tmp_path / 'blip2_opt.pth', '--out', tmp_path / 'out', '--override', heads)
  assert missing.returncode == 2 and 'omit the frozen ViT' in missing.stderr
  result = run_cli(tmp_path / 'blip2_opt.pth', tmp_path / 'eva_vit_g.pth', tmp_path / 'opt',
                   '--out', tmp_path / 'out', '--override', heads)
  assert result.returncode == 0, result.stderr
  assert 'the last EVA block, which BLIP-2 drops' in result.stdout
  model, _ = blip_jax.load(tmp_path / 'out')
  x = images(size=28)
  ids = torch.tensor([[2, 11, 12]])
  full = torch.cat([torch.full((1, 4), 39), ids], 1)
  with torch.no_grad():
    ref = hf(pixel_values=x[:1], input_ids=full).logits
  assert_close(model.logits(model.image_embeds(nhwc(x[:1])), ids.numpy()), ref, 'BLIP-2 OPT logits')
