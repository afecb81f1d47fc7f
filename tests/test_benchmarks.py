"""Smoke runs of the benchmarks and studies (tiny settings; no timing is asserted, and
RESULTS.md is left alone)."""

import math

import numpy as np

from benchmarks import (
    bad_inputs,
    logit_explosion,
    muon_step,
    newton_schulz,
    scale_plan,
    token_efficiency,
)
from muonclip_jax._newton_schulz import choose_method


def test_newton_schulz_benchmark_row():
  row = newton_schulz.measure_shape(768, 2304, np.dtype("float32"), 1,
                                    np.random.default_rng(0))
  assert row[0] == "768x2304" and row[1] == "gram"
  assert float(row[2]) > 1.4  # the Gram path's FLOP saving on this shape


def test_muon_step_benchmark_runs():
  # The smoke run's 1/8-size matrices take the GPT-2 shapes' Newton–Schulz paths.
  paths = lambda shapes: [choose_method(m, n, 5) for m, n in shapes.values()]
  assert paths(muon_step.QUICK_LAYER) == paths(muon_step.LAYER)
  md = muon_step.run(layers=1, rounds=1, shapes=muon_step.QUICK_LAYER)
  assert "optax.contrib.muon" in md and "Ratio ours / optax.contrib.muon" in md


def test_scale_plan_tree_is_kimi_k2_sized_and_balanced():
  total, active = scale_plan.param_counts()
  # Kimi K2 (arXiv 2507.20534): 1.04T total, 32.6B activated (the MTP layer and
  # rounding account for the rest).
  assert abs(total / 1.04e12 - 1) < 0.02 and abs(active / 32.6e9 - 1) < 0.02
  result = scale_plan.study(2048)  # no devices: an AbstractMesh
  assert result["ratio"] < 1.05 and result["x_ratio"] > 4
  assert result["moved"] < result["x_moved"] / 10


def test_logit_explosion_quick():
  results = logit_explosion.main(["--quick"])
  assert set(results) == {0}
  assert set(results[0]) >= {"muon", "muonclip"}


def test_token_efficiency_quick():
  out = token_efficiency.main(["--quick", "--adamw-lrs", "3e-3", "--muon-lrs", "1e-2"])
  assert out
  flat = [v for v in _numbers(out)]
  assert flat and all(math.isfinite(v) for v in flat)


def _numbers(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _numbers(v)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from _numbers(v)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield float(tree)


def test_bad_inputs_classifies_each_row_and_survives_a_crash(monkeypatch):
  """The planner and soft-cap rows (fast): clear errors; a row whose check crashes is
  reported as not run, and the rows after it still run."""
  def crash():
    raise RuntimeError("boom")
  monkeypatch.setattr(bad_inputs, "plan_mesh_size", crash)
  results = bad_inputs.run(["plan_muon_sharding", "logit_soft_cap"])
  outcomes = {(r.call, r.bad_input): r.outcome for r in results}
  assert outcomes.pop(("plan_muon_sharding", "mesh {'x': 2.7}")) == bad_inputs.NOT_RUN
  assert len(outcomes) == 6 and set(outcomes.values()) == {bad_inputs.CLEAR}, results
  assert bad_inputs.totals(results) == (
      "tried 6, clear error 6, right answer 0, silent 0, lost 0, not run 1")
  text = bad_inputs.markdown(results)
  assert "| call | bad input | outcome | what happened |" in text and "**not run**" in text
