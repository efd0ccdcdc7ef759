"""The README's examples marked `# runs offline` must run as written."""

import pathlib
import re

import pytest

README = (pathlib.Path(__file__).parents[1] / 'README.md').read_text()
EXAMPLES = [code for code in re.findall(r'```python\n(.*?)```', README, re.S)
            if code.startswith('# runs offline')]


def test_readme_has_examples():
  assert len(EXAMPLES) >= 2


@pytest.mark.parametrize('index', range(len(EXAMPLES)))
def test_readme_example_runs(index, capsys):
  code = EXAMPLES[index]
  expected = re.search(r'print\(.*\)\s+# (.*)\n', code).group(1)
  exec(compile(code, f'README example {index}', 'exec'), {})
  assert capsys.readouterr().out.strip() == expected.strip()
