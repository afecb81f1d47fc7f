"""DeepMind's real Gemma attention modules, without TensorFlow.

``gemma`` 3.3.0's model code (``gemma/gm/nn/_modules.py``, ``_layers.py``,
``gemma/gm/math/_positional_embeddings.py``) needs only jax and flax, but
importing it goes through ``kauldron``, whose ``kauldron.typing`` imports
TensorFlow (about 2 GB installed, 7 s to import): ``pip install gemma`` with its
dependencies adds minutes to CI. So this loader, when the full package is not
installed, takes those three files from the pinned wheel (``pip download
gemma==3.3.0 --no-deps``, 190 kB, its sha256 checked) and imports them as they
are, with a two-name stand-in for kauldron: ``kd.nn.Identity`` (the
attention-weights hook, an identity) and the ``kauldron.typing`` shape
annotations (plain ``typing.Any``). Every line of attention math and every
parameter is the library's own.

If ``gemma`` is installed (``pip install gemma==3.3.0``, with TensorFlow), the
installed package is used instead.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import types
import typing
import zipfile
from pathlib import Path

VERSION = "3.3.0"
WHEEL = f"gemma-{VERSION}-py3-none-any.whl"
SHA256 = "b76d0a6b0602b5f4ece98dd161400f638ebe84e70e246732e5cba584045b7942"
FILES = ("gemma/gm/nn/_modules.py", "gemma/gm/nn/_layers.py",
         "gemma/gm/math/_positional_embeddings.py")
CACHE = Path(os.environ.get("MUONCLIP_CACHE", Path.home() / ".cache" / "muonclip_jax"))


def _installed() -> types.ModuleType | None:
  try:
    from gemma.gm.nn import _modules  # noqa: PLC0415
  except Exception:  # noqa: BLE001 - any import failure means "not usable as installed"
    return None
  return _modules


def wheel_path() -> Path:
  """The pinned wheel, downloaded once into the cache (``pip download --no-deps``)."""
  path = Path(os.environ.get("MUONCLIP_GEMMA_WHEEL", CACHE / WHEEL))
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    f"gemma=={VERSION}", "-d", str(path.parent)], check=True)
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  if digest != SHA256:
    raise RuntimeError(f"{path}: sha256 {digest}, expected {SHA256} (gemma {VERSION})")
  return path


def _kauldron_stand_in() -> None:
  """``kauldron.kd.nn.Identity`` and ``kauldron.typing`` annotations, nothing else."""
  from flax import linen as nn  # noqa: PLC0415

  class Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x

  class _Annotation:
    def __class_getitem__(cls, item):
      return typing.Any

  kauldron = types.ModuleType("kauldron")
  kd = types.ModuleType("kauldron.kd")
  kd.nn = types.SimpleNamespace(Identity=Identity)
  ktyping = types.ModuleType("kauldron.typing")
  for name in ("Bool", "Int", "Float", "UInt8", "Array"):
    setattr(ktyping, name, _Annotation)
  ktyping.typechecked = lambda f: f
  kauldron.kd, kauldron.typing = kd, ktyping
  sys.modules.update({"kauldron": kauldron, "kauldron.kd": kd, "kauldron.typing": ktyping})


def load() -> tuple[types.ModuleType, str]:
  """``(gemma.gm.nn._modules, source)``: the installed package or the pinned wheel's files."""
  mod = _installed()
  if mod is not None:
    import gemma  # noqa: PLC0415
    return mod, f"gemma {gemma.__version__} (installed)"
  target = CACHE / f"gemma-{VERSION}-src"
  if not all((target / f).exists() for f in FILES):
    with zipfile.ZipFile(wheel_path()) as z:
      for f in FILES:
        (target / f).parent.mkdir(parents=True, exist_ok=True)
        (target / f).write_bytes(z.read(f))
  for pkg in ("gemma", "gemma.gm", "gemma.gm.nn", "gemma.gm.math"):
    if pkg not in sys.modules:
      m = types.ModuleType(pkg)
      m.__path__ = [str(target / pkg.replace(".", "/"))]
      sys.modules[pkg] = m
  if "kauldron" not in sys.modules:
    _kauldron_stand_in()
  return (importlib.import_module("gemma.gm.nn._modules"),
          f"gemma {VERSION} wheel files {', '.join(FILES)}")
