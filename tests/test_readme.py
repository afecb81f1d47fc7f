"""The README's Python blocks run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_python_blocks():
  assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
  exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_ci_runs_the_readme_test_command():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
  test_cmd = next(c for c in commands if "pytest" in c)
  assert test_cmd in ci
