"""Every notebook runs top to bottom (nbclient) under the small setting.

``MUONCLIP_NB_SMALL=1`` shrinks models and step counts; a failing cell fails
the test with the cell's traceback. Kernels start with a clean ``XLA_FLAGS``
so that notebook 04 can ask for its own host devices; 04 gets a fresh kernel
of its own (its first cell must run before jax starts). Notebooks 01-03 share
one kernel, so that jax, flax and the example model's compiled initialisers
load once; each of them starts with ``%reset -f``, so none can lean on names
that another defined.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
OWN_KERNEL = {"04_sharding"}  # sets XLA_FLAGS in its first cell, before jax starts


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
def test_needs_only_the_installed_package(path: Path) -> None:
  """On Colab a notebook has the pip-installed package and nothing of the repository."""
  code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                   if c.cell_type == "code")
  for crutch in ("sys.path", "git clone", "from examples", "from benchmarks", "import examples",
                 "import benchmarks"):
    assert crutch not in code, f"{path.name} uses {crutch!r}"
  assert '%pip install -q "muonclip_jax[examples] @ git+' in code


def _kernel_env(mp: pytest.MonkeyPatch) -> None:
  """The environment a kernel starts with (it copies ``os.environ`` at start)."""
  mp.setenv("MUONCLIP_NB_SMALL", "1")
  mp.setenv("MPLBACKEND", "Agg")
  mp.delenv("XLA_FLAGS", raising=False)


@pytest.fixture(scope="module")
def shared_kernel() -> Iterator[KernelManager]:
  """One kernel for the notebooks that need no fresh process."""
  km = KernelManager(kernel_name="python3")
  with pytest.MonkeyPatch.context() as mp:
    _kernel_env(mp)
    km.start_kernel(cwd=str(ROOT / "notebooks"))
  try:
    yield km
  finally:
    km.shutdown_kernel(now=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch,
                       request: pytest.FixtureRequest) -> None:
  nb = nbformat.read(path, as_version=4)
  km = None
  if path.stem in OWN_KERNEL:
    _kernel_env(monkeypatch)
  else:
    km = request.getfixturevalue("shared_kernel")
    nb.cells.insert(0, new_code_cell("%reset -f"))  # nothing from the notebook before
  client = NotebookClient(nb, km=km, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  try:
    client.execute()
  finally:
    if km is not None and client.kc is not None:
      client.kc.stop_channels()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
