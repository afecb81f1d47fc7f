"""The package's import graph: no cycle, and no arrow that runs back up a layer.

The layer table below is the house drawing of ``muonclip_jax/__init__.py`` in
data: a module may import modules of its own layer or of a lower one. A new
module must be placed in it (the test refuses an unplaced module), which is
the moment to decide where it belongs.
"""

import ast
import importlib
import pathlib
import pkgutil

import muonclip_jax

LAYERS = {
    # 0. Vocabulary: names, the statistic's contract, coefficients, adapters.
    "_paths": 0, "_statistic": 0, "_coefficients": 0, "_layer_axis": 0, "_tokamax": 0,
    "_checkpoint": 0, "_view_sharding": 0,
    # 1. One stage of the algorithm each, or one question about a leaf.
    "_momentum": 1, "_shape_scaling": 1, "_newton_schulz": 1, "_dimensions": 1,
    "_routing": 1, "_qk_layouts": 1, "_attention": 1, "_flash_attention": 1,
    "_mesh_placement": 1,
    # 2. Plans and reports built from the stages; QK-Clip.
    "_mesh_plan": 2, "_mesh_cost": 2, "_routing_report": 2, "_sharding": 2,
    "_qk_statistics": 2, "_qk_discovery": 2, "_qk_factors": 2,
    # Adapters for other model libraries (Gemma, Equinox, MaxText, hand-written).
    "_presets": 2, "_equinox": 2, "_gemma": 2, "_maxtext": 2, "_tape": 2,
    # 3. Transforms built from those.
    "_muon": 3, "_qk_clip": 3, "_qk_clip_metrics": 3,
    # 4. The composite optimiser.
    "_muonclip": 4,
    # 5. The public API.
    "__init__": 5,
}

PACKAGE = pathlib.Path(muonclip_jax.__file__).parent


def _graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports, read from the source (ast)."""
  graph = {}
  for path in sorted(PACKAGE.glob("*.py")):
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        if node.module.startswith("muonclip_jax."):
          deps.add(node.module.split(".")[1])
        elif node.module == "muonclip_jax":
          deps |= {a.name for a in node.names if a.name.startswith("_")}
      elif isinstance(node, ast.Import):
        deps |= {a.name.split(".")[1] for a in node.names
                 if a.name.startswith("muonclip_jax.")}
    graph[path.stem] = deps - {path.stem}
  return graph


def test_every_module_imports_and_has_a_layer():
  names = sorted(m.name for m in pkgutil.iter_modules(muonclip_jax.__path__))
  for name in names:
    importlib.import_module(f"muonclip_jax.{name}")
  unplaced = sorted(set(_graph()) - set(LAYERS))
  assert not unplaced, f"place these modules in LAYERS: {unplaced}"
  assert not sorted(set(LAYERS) - set(_graph())), "LAYERS names modules that no longer exist"


def test_no_import_cycle():
  graph = _graph()
  state: dict[str, int] = {}  # 1: on the current path, 2: done.

  def visit(m, path):
    state[m] = 1
    for d in sorted(graph[m]):
      assert state.get(d) != 1, "import cycle: " + " -> ".join(path + [m, d])
      if d not in state:
        visit(d, path + [m])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [])


def test_imports_only_run_down_the_layers():
  up = [f"{m} (layer {LAYERS[m]}) imports {d} (layer {LAYERS[d]})"
        for m, deps in _graph().items() for d in sorted(deps) if LAYERS[d] > LAYERS[m]]
  assert not up, "arrows that run back up:\n" + "\n".join(up)


def test_the_test_sees_a_real_graph():
  """The parser finds known arrows, so an empty graph cannot pass for a clean one."""
  graph = _graph()
  assert "_statistic" in graph["_attention"] and "_statistic" in graph["_qk_statistics"]
  assert "_muon" in graph["_muonclip"] and "_sharding" in graph["_muon"]
