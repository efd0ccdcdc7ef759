"""Checkpoint reading and the errors a user sees for a checkpoint that does not fit."""

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

from blip_jax.convert import ConversionError, load_torch
from blip_jax.testing.torch_refs import (
  ENC,
  OVERRIDES,
  assert_close,
  build_hf,
  images,
  nhwc,
  text_batch,
  to_salesforce,
)


@pytest.fixture(scope='module')
def hf_caption():
  return build_hf(transformers.BlipForConditionalGeneration)


def test_hf_folder_reads_config_json_and_detects_the_task(tmp_path, hf_caption):
  hf_caption.save_pretrained(tmp_path)  # config.json + model.safetensors
  model, cfg, report = load_torch(tmp_path)  # heads, eps and token ids come from config.json
  assert report.task == 'caption' and report.layout == 'huggingface'
  assert (cfg.vision.num_heads, cfg.text.num_heads, cfg.bos_token_id) == (2, 2, 97)
  x = images()
  with torch.no_grad():
    ref = hf_caption.vision_model(x).last_hidden_state
  assert_close(model.image_embeds(nhwc(x)), ref, 'vision states from an HF folder')


def test_safetensors_and_module_prefix(tmp_path, hf_caption):
  sd = {f'module.{k}': v.contiguous() for k, v in to_salesforce(hf_caption.state_dict()).items()}
  path = tmp_path / 'weights.safetensors'
  safetensors.torch.save_file(sd, path)
  from_file, _, _ = load_torch(path, **OVERRIDES)
  from_dict, _, _ = load_torch(hf_caption.state_dict(), **OVERRIDES)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(from_file, nnx.Param)),
                            nnx.to_flat_state(nnx.state(from_dict, nnx.Param))):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))


def test_unknown_key_is_named(hf_caption):
  sd = dict(hf_caption.state_dict())
  sd['text_decoder.bert.encoder.layer.0.attention.self.extra.weight'] = torch.zeros(3)
  with pytest.raises(ConversionError, match=r'attention\.self\.extra\.weight'):
    load_torch(sd, **OVERRIDES)
  # strict=False converts and lists it instead.
  _, _, report = load_torch(sd, strict=False, **OVERRIDES)
  assert 'text_decoder.bert.encoder.layer.0.attention.self.extra.weight' in report.skipped


def test_missing_key_is_named(hf_caption):
  sd = dict(hf_caption.state_dict())
  del sd['text_decoder.bert.encoder.layer.1.intermediate.dense.bias']
  with pytest.raises(ConversionError, match=r"missing key 'text_decoder\.bert\.encoder\.layer\.1\.intermediate\.dense\.bias'"):
    load_torch(sd, **OVERRIDES)


def test_shape_mismatch_names_key_and_shapes(hf_caption):
  sd = dict(hf_caption.state_dict())
  key = 'text_decoder.bert.encoder.layer.0.output.dense.weight'
  sd[key] = torch.zeros(24, 36)
  with pytest.raises(ConversionError, match=r"layer\.0\.output\.dense\.weight'.*\(24, 36\).*\(37, 24\)"):
    load_torch(sd, **OVERRIDES)


def test_checkpoint_of_another_family_is_refused():
  torch.manual_seed(0)
  clip = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
      vision_config=dict(hidden_size=16, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8)))
  with pytest.raises(ConversionError, match='not a BLIP checkpoint'):
    load_torch(clip.state_dict(), family='blip', task='retrieval')
  # Detected as what it is, a BLIP task is no task of that family.
  with pytest.raises(ConversionError, match="unknown clip task 'retrieval'"):
    load_torch(clip.state_dict(), task='retrieval')


def test_wrong_task_is_refused(hf_caption):
  with pytest.raises(ConversionError, match='missing key'):
    load_torch(hf_caption.state_dict(), task='retrieval', **OVERRIDES)
  with pytest.raises(ConversionError, match="unknown blip task 'captioning'"):
    load_torch(hf_caption.state_dict(), task='captioning', **OVERRIDES)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing.pth'):
    load_torch(tmp_path / 'nothing.pth')


def test_a_blip_itm_state_dict_without_temp_converts_and_reports_it():
  """The original BLIP_ITM class holds no `temp`; its ITC score is the plain cosine."""
  hf = build_hf(transformers.BlipForImageTextRetrieval)
  state_dict = to_salesforce(hf.state_dict())
  assert 'temp' not in state_dict
  model, _, report = load_torch(state_dict, task='retrieval', **OVERRIDES)  # strict: every other key read
  assert 'BLIP_ITM' in report.missing['temp']
  x = images()
  ids, mask = text_batch(first_token=ENC)
  with torch.no_grad():
    itm = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=True).itm_score
    cosine = hf(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=False).itm_score
  embeds = model.image_embeds(nhwc(x))
  assert_close(model.itm_logits(embeds, ids.numpy(), mask.numpy()), itm, 'ITM logits')
  features = model.image_features(embeds), model.text_features(model.text_embeds(ids.numpy(), mask.numpy()))
  assert_close(model.similarity(*features), cosine, 'ITC cosine')


def test_momentum_copies_start_from_the_online_weights_when_absent():
  hf = build_hf(transformers.BlipForImageTextRetrieval)
  model, cfg, report = load_torch(hf.state_dict(), keep_training_state=True, **OVERRIDES)
  assert cfg.with_momentum and 'text_proj_m.weight' in report.missing
  np.testing.assert_array_equal(model.text_proj_m.kernel[...], hf.text_proj.weight.detach().numpy().T)


@pytest.mark.parametrize('weights', ['sharded', 'pytorch_model.bin'])
def test_hf_folder_formats(tmp_path, hf_caption, weights):
  if weights == 'sharded':  # several *.safetensors + model.safetensors.index.json
    hf_caption.save_pretrained(tmp_path, max_shard_size='20KB')
    assert (tmp_path / 'model.safetensors.index.json').exists()
  else:  # older HF folders: config.json + a pickle
    hf_caption.config.save_pretrained(tmp_path)
    torch.save(hf_caption.state_dict(), tmp_path / 'pytorch_model.bin')
  model, _, _ = load_torch(tmp_path)
  x = images()
  with torch.no_grad():
    ref = hf_caption.vision_model(x).last_hidden_state
  assert_close(model.image_embeds(nhwc(x)), ref, 'vision states')


class _WritesAFile:
  """A pickle payload that would create a file when unpickled by a loader that runs code."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (open, (self.target, 'w'))


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
  import pickle
  target = tmp_path / 'pwned'
  path = tmp_path / 'model.pth'
  with open(path, 'wb') as f:
    pickle.dump({'state_dict': _WritesAFile(str(target))}, f)
  with pytest.raises(ValueError, match=r'model.pth: could not read the PyTorch checkpoint'):
    load_torch(str(path))
  assert not target.exists()


class _Scripted(torch.nn.Module):
  """A TorchScript module with what archives hold: nested modules, a non-contiguous, a bf16, an
  fp16, a 0-d and an offset parameter, int and bool buffers, and a tensor that is no state."""

  def __init__(self):
    super().__init__()
    self.seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    self.transposed = torch.nn.Parameter(torch.randn(6, 4).t())
    self.bf16 = torch.nn.Parameter(torch.randn(3, 2).to(torch.bfloat16))
    self.fp16 = torch.nn.Parameter(torch.randn(2).half())
    self.offset = torch.nn.Parameter(torch.randn(10)[2:6])
    self.scale = torch.nn.Parameter(torch.tensor(2.5))
    self.register_buffer('steps', torch.arange(5))
    self.register_buffer('flags', torch.tensor([True, False]))
    self.plain = torch.ones(3)  # an attribute: not in state_dict()

  def forward(self, x):
    return self.seq(x @ self.transposed) * self.scale + self.plain.sum()


def test_a_torchscript_archive_is_read_without_torch_jit_into_its_state_dict(tmp_path, monkeypatch):
  from blip_jax.convert.torchscript import read_state_dict
  torch.manual_seed(0)
  path = tmp_path / 'scripted.pt'
  torch.jit.script(_Scripted()).save(str(path))
  expected = torch.jit.load(str(path)).state_dict()
  monkeypatch.setattr(torch.jit, 'load', lambda *a, **k: pytest.fail('torch.jit.load was called'))
  got = read_state_dict(str(path))
  assert sorted(got) == sorted(expected)
  for key, tensor in expected.items():
    np.testing.assert_array_equal(got[key], tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy(),
                                  err_msg=key)
    assert got[key].shape == tuple(tensor.shape), key


def test_a_torchscript_archive_whose_pickle_runs_code_is_refused_and_runs_nothing(tmp_path):
  import pickle
  import zipfile
  target = tmp_path / 'pwned'
  good, bad = tmp_path / 'good.pt', tmp_path / 'bad.pt'
  torch.jit.script(_Scripted()).save(str(good))
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, 'w') as dst:
    for item in src.infolist():
      data = src.read(item)
      if item.filename.endswith('/data.pkl'):
        data = pickle.dumps({'seq': _WritesAFile(str(target))}, protocol=2)
      dst.writestr(item, data)
  with pytest.raises(ValueError, match=r'bad.pt: data.pkl refers to io.open, .* refusing to load it'):
    load_torch(str(bad))
  assert not target.exists()


def test_a_safetensors_index_cannot_point_outside_its_folder(tmp_path):
  import json
  folder = tmp_path / 'hf'
  folder.mkdir()
  safetensors.torch.save_file({'w': torch.zeros(2)}, str(tmp_path / 'outside.safetensors'))
  (folder / 'model.safetensors.index.json').write_text(
      json.dumps({'weight_map': {'w': '../outside.safetensors'}}))
  with pytest.raises(ValueError, match=r"index.json: weight_map names '../outside.safetensors', outside"):
    load_torch(str(folder))



def test_a_sharded_index_reads_shards_that_are_symlinks_as_in_the_hf_cache(tmp_path, hf_caption):
  import json
  blobs, snapshot = tmp_path / 'blobs', tmp_path / 'snapshots' / 'rev'
  blobs.mkdir()
  snapshot.mkdir(parents=True)
  state = hf_caption.state_dict()
  names = sorted(state)
  halves = {'model-00001-of-00002.safetensors': names[::2], 'model-00002-of-00002.safetensors': names[1::2]}
  for shard, keys in halves.items():
    safetensors.torch.save_file({k: state[k].contiguous() for k in keys}, str(blobs / shard))
    (snapshot / shard).symlink_to(blobs / shard)
  (snapshot / 'model.safetensors.index.json').write_text(
      json.dumps({'weight_map': {k: shard for shard, keys in halves.items() for k in keys}}))
  hf_caption.config.save_pretrained(snapshot)
  single = tmp_path / 'single'
  hf_caption.save_pretrained(single)
  sharded, _, _ = load_torch(snapshot)
  reference, _, _ = load_torch(single)
  for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(nnx.state(reference, nnx.Param)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
