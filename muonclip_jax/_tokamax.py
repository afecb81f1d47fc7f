"""The one adapter to tokamax (Pallas attention kernels), an optional dependency.

Tokamax's attention ops and the TPU splash kernel live under ``tokamax._src``
(as MaxText imports them too); nothing else in the package touches tokamax.
The adapter checks the installed version against the range this package was
tested with and fails with a message that names it and how to install it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import types

__all__ = ["INSTALL_HINT", "SUPPORTED", "load"]

# Tested: 0.0.12 (the newest release when written). Private modules can move
# between releases, so newer ones are refused until tested.
SUPPORTED = ((0, 0, 12), (0, 0, 13))  # [min, max)
INSTALL_HINT = 'pip install "muonclip_jax[kernels]"  (tokamax>=0.0.12,<0.0.13)'

_MODULES = {
    "base": "tokamax._src.ops.attention.base",
    "triton": "tokamax._src.ops.attention.pallas_triton",
    "mosaic_gpu": "tokamax._src.ops.attention.pallas_mosaic_gpu",
    "splash": "tokamax._src.ops.experimental.tpu.splash_attention.splash_attention_kernel",
    "splash_mask": "tokamax._src.ops.experimental.tpu.splash_attention.splash_attention_mask",
    "splash_base": "tokamax._src.ops.experimental.tpu.splash_attention.base",
}


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


@functools.cache
def load() -> types.SimpleNamespace:
  """tokamax's attention modules, after checking the installed version.

  Returns:
    A namespace with ``base``, ``triton``, ``mosaic_gpu``, ``splash``,
    ``splash_mask`` and ``splash_base`` (tokamax private modules).

  Raises:
    ImportError: tokamax is missing, or its version is outside the tested
      range; the message says which range and how to install it.
  """
  try:
    version = importlib.metadata.version("tokamax")
  except importlib.metadata.PackageNotFoundError:
    raise ImportError(
        f"flash_attention: this implementation needs tokamax, which is not installed. "
        f"Install the kernels extra: {INSTALL_HINT}") from None
  if not SUPPORTED[0] <= _version(version) < SUPPORTED[1]:
    raise ImportError(
        f"flash_attention: tokamax {version} is installed, but muonclip_jax supports "
        f"tokamax>=0.0.12,<0.0.13 (its kernels are private modules that change between "
        f"releases): {INSTALL_HINT}")
  modules = {k: importlib.import_module(v) for k, v in _MODULES.items()}
  # tokamax reads its options from absl flags and, when nothing has parsed them,
  # parses sys.argv itself: the host program's own arguments (pytest's, a training
  # script's --steps) then fail as unknown absl flags. Use the defaults instead;
  # a program that parses absl flags itself (absl.app.run) still can.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return types.SimpleNamespace(**modules)
