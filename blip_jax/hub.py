"""HuggingFace Hub ids -> local folders, through `huggingface_hub` and its shared cache.

`resolve('Salesforce/blip-itm-base-coco')` downloads the repository's model and tokenizer files
into the HF cache (`~/.cache/huggingface/hub`, or `HF_HOME` / `HF_HUB_CACHE`) on first use and
returns the snapshot folder; with `HF_HUB_OFFLINE=1` it reads the cache only.
"""

from __future__ import annotations

import os
import re

# What a model needs of a repository: weights, configs and tokenizer files (not its other formats).
MODEL_FILES = ('*.json', '*.safetensors', '*.bin', '*.pth', '*.pt', '*.txt', '*.model', 'merges.txt')
TOKENIZER_FILES = ('tokenizer*', 'vocab*', 'merges.txt', 'special_tokens_map.json', 'added_tokens.json', '*.model')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$')


def looks_like_hub_id(source) -> bool:
  return isinstance(source, str) and not os.path.exists(source) and bool(_HUB_ID.match(source))


def resolve(repo_id: str, *, revision: str | None = None, allow_patterns=MODEL_FILES) -> str:
  """The local snapshot folder of `repo_id` (downloaded into the HF cache if needed)."""
  import huggingface_hub
  from huggingface_hub.utils import LocalEntryNotFoundError
  offline = os.environ.get('HF_HUB_OFFLINE', '0').lower() in ('1', 'true', 'yes', 'on')
  try:
    return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(allow_patterns))
  except LocalEntryNotFoundError as e:
    where = 'the HF cache (HF_HUB_OFFLINE is set)' if offline else 'the Hub or the HF cache (no network?)'
    raise FileNotFoundError(f'{repo_id}: not found in {where}: download it once with network access, or give a '
                            'local path') from e
  except huggingface_hub.errors.RepositoryNotFoundError as e:
    raise FileNotFoundError(f'{repo_id}: no such repository on the HuggingFace Hub') from e
