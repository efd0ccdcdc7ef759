"""The README's example must run as written."""

import pathlib
import re


def test_readme_example_runs(capsys):
  readme = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
  api = readme[readme.index('## API'):]
  code = re.search(r'```python\n(.*?)```', api, re.S).group(1)
  exec(compile(code, 'README.md', 'exec'), {})
  assert capsys.readouterr().out.strip() == '(2, 2) (2,)'
