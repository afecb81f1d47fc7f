"""Every notebook runs top to bottom (nbclient) under the small setting.

``MUONCLIP_NB_SMALL=1`` shrinks models and step counts; a failing cell fails
the test with the cell's traceback. The kernel starts with a clean
``XLA_FLAGS`` so that notebook 04 can ask for its own host devices.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist() -> None:
  assert [p.name for p in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_qk_clip.ipynb", "03_muon_vs_adamw.ipynb",
      "04_sharding.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path: Path) -> None:
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, path.name
  assert "import muonclip_jax" in nb.cells[1].source  # the Colab set-up cell


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setenv("MUONCLIP_NB_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
