"""Every Python example of the README and docs/ runs as written, in a folder where the files,
folders and Hub ids it names exist (`docs_sandbox.py`: tiny random models in each layout, an HF
cache laid out offline); an example ending in `print(...)  # OUTPUT` must print OUTPUT."""

import pathlib
import re

import docs_sandbox
import huggingface_hub
import pytest

ROOT = pathlib.Path(__file__).parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
EXAMPLES = [(str(page.relative_to(ROOT)), i, code) for page in PAGES
            for i, code in enumerate(re.findall(r'```python\n(.*?)```', page.read_text(), re.S))]


def test_every_page_is_linked_from_the_readme():
  readme = (ROOT / 'README.md').read_text()
  assert all(f'docs/{page.name}' in readme for page in PAGES[1:]), [p.name for p in PAGES[1:]
                                                                   if f'docs/{p.name}' not in readme]
  assert len(readme.encode()) <= 15_000, len(readme.encode())


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory):
  root = tmp_path_factory.mktemp('docs')
  return root, docs_sandbox.build(root)


@pytest.mark.parametrize('page,index,code', EXAMPLES, ids=[f'{p}:{i}' for p, i, _ in EXAMPLES])
def test_example_runs(page, index, code, sandbox, monkeypatch, capsys):
  root, names = sandbox
  monkeypatch.chdir(root)
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(names['hub']))
  namespace = {k: v for k, v in names.items() if k != 'hub'}
  exec(compile(code, f'{page} example {index}', 'exec'), namespace)
  expected = re.search(r'print\(.*\)\s+# (.*)\n\s*$', code)
  if expected:
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected.group(1).strip()
