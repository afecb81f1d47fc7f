"""The API documentation builds with warnings as errors (a broken docstring fails CI)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
  # The dummy builder reads and checks every page (autodoc, autosummary, the
  # notebooks through myst-nb, not executed) without writing HTML; the README's
  # command builds the same sources to HTML.
  out = subprocess.run(
      [sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "dummy",
       "-d", str(tmp_path / "doctrees"), "docs", str(tmp_path / "out")],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
