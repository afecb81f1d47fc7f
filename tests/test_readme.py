"""The README's and the docs guides' Python blocks run as written.

Blocks fenced ```python are complete programs and run here; excerpts that need a
model of their own (a Gemma or Equinox training step) are fenced ```py and do not.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))
BLOCKS = [(path, i, block)
          for path in [README, *GUIDES]
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))]


def test_readme_has_python_blocks():
  assert sum(path == README for path, _, _ in BLOCKS) >= 2


@pytest.mark.parametrize("path,index,block", BLOCKS,
                         ids=[f"{p.name}[{i}]" for p, i, _ in BLOCKS])
def test_python_block_runs(path, index, block):
  exec(compile(block, f"{path.name}[python block {index}]", "exec"), {})


def test_ci_runs_the_readme_test_command():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  commands = re.findall(r"```bash\n(.*?)\n```", text, re.S)
  test_cmd = next(c for c in commands if "pytest" in c)
  assert test_cmd in ci
