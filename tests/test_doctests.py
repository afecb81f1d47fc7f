"""The ``Examples:`` in the package's docstrings run as written."""

import doctest
import importlib
import pkgutil

import pytest

import muonclip_jax

MODULES = sorted(m.name for m in pkgutil.iter_modules(muonclip_jax.__path__, "muonclip_jax."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           raise_on_error=False, report=True)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_main_entry_points_have_examples():
  finder = doctest.DocTestFinder()
  for fn in (muonclip_jax.plan_muon_sharding, muonclip_jax.qk_clip_metrics):
    assert any(t.examples for t in finder.find(fn)), fn.__name__
