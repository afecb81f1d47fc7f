"""Everything across JAX processes: 2 processes x 4 host CPU devices (jax.distributed, gloo).

Each test starts a fresh two-process job through tests/support/distributed.py (a free
port, short jax.distributed timeouts, SIGKILL of every process on failure or
timeout) and compares what the processes report with what one process with 8
(or 4) devices computes here.

Tolerance of 2 processes against 1 (the training run): values differ in the
last bits, because where XLA reduces over devices (gradients over the batch,
matmuls over a sharded contracting axis) gloo's cross-process collectives add
the partial sums in another order than XLA's in-process ones: the first
step's max logits differ by 1 ulp (2.4e-7 relative), the loss after 3 steps
by ~1e-7 (``RTOL``). Parameters and optimizer state get ``ATOL``: Newton–Schulz
amplifies a rounding difference along a small singular direction by up to
3.4445^5 ~ 480 (the slope of Keller's polynomial at 0, five steps); the
largest difference measured was 1.7e-6 on a weight of 0.054 after 3 steps.
The two processes agree with each other bitwise.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest
from support.checkpoint_setup import abstract, setup
from support.distributed import run_distributed
from support.workers_training import example_config, example_data, gather, lm_module, train

import muonclip_jax as mc

RTOL, ATOL = 1e-5, 1e-5
MESHES = [(8, 1), (1, 8)]  # FSDP (batch and rows over data), tensor parallel (columns over model)


@pytest.fixture(scope="module")
def two_process_training(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("train")
  return run_distributed("support.workers_training:train_example", args={"meshes": MESHES},
                         tmp_path=tmp, timeout=150)


@pytest.mark.parametrize("mesh", MESHES, ids=["fsdp", "tensor_parallel"])
def test_two_processes_train_the_example_like_one(two_process_training, mesh):
  p0, p1 = (r[mesh] for r in two_process_training)
  # The processes agree bitwise on every replicated metric and gathered array.
  for key in ("loss", "heads", "telemetry", "summary", "compilations"):
    assert p0[key] == p1[key], key
  chex.assert_trees_all_equal(p0["params"], p1["params"])
  assert p0["compilations"] == 1
  data_axis = mesh[0]
  assert (p0["rows"], p1["rows"]) == (((0, 4), (4, 8)) if data_axis == 8 else ((0, 8), (0, 8)))

  lm = lm_module()
  single = train(lm.Trainer(example_config(mesh), example_data()))
  m = single.metrics
  # The statistic is the max over every process's rows (see the next test).
  np.testing.assert_allclose(p0["heads"], m["head_max_logit"], rtol=RTOL)
  np.testing.assert_allclose(p0["loss"], m["loss"], rtol=RTOL)
  assert p0["telemetry"] == lm.clip_telemetry(single.opt_state)
  assert p0["telemetry"]["clipped_total"] > 0  # QK-Clip acted
  assert p0["summary"] == mc.muon_sharding_summary(single.params, single.mesh)
  chex.assert_trees_all_close(p0["params"], gather(single.params), rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(p0["opt_state"], gather(single.opt_state), rtol=RTOL, atol=ATOL)


def test_statistic_needs_the_other_process_rows():
  """Each process's rows hold the largest logit of some head, far beyond ``RTOL``.

  So a max over one process's rows would fail the comparison above.
  """
  lm = lm_module()
  cfg = example_config((8, 1))
  graphdef, params = lm.init_model(cfg.model, cfg.seed)
  x, _ = example_data().train_batch(cfg.seed, 0, cfg.batch)
  heads = [np.asarray(lm.head_max_logits(lm.apply_model(graphdef, params, x[rows])[1],
                                         cfg.model.num_layers))
           for rows in (slice(0, 4), slice(4, 8))]
  gap = (heads[1] - heads[0]) / heads[0]
  assert gap.max() > 1000 * RTOL and -gap.min() > 1000 * RTOL


def _on_four_devices():
  """MuonClip state on one process with 4 devices, after 3 steps."""
  _, _, params, state, train_step = setup((2, 2), devices=jax.devices()[:4])
  p, s = params, state
  for _ in range(3):
    p, s = train_step(p, s)
  return params, state, p, s


def test_checkpoints_across_processes_counts_and_meshes(tmp_path):
  params4, state4, p4, s4 = _on_four_devices()
  manager = mc.make_checkpoint_manager(tmp_path / "single")
  mc.save_checkpoint(manager, 3, p4, s4)
  manager.close()

  r0, r1 = run_distributed("support.workers_training:checkpoints", tmp_path=tmp_path, timeout=90,
                           args={"root": str(tmp_path / "mp"),
                                 "single_saved": str(tmp_path / "single")})
  chex.assert_trees_all_equal(r0, r1)  # the same on both processes, warnings included
  # A restore right after an asynchronous save sees the committed step, bitwise.
  assert r0["steps"] == [1, 2, 3]
  chex.assert_trees_all_equal(r0["restored"], r0["saved"][3])
  # Damage to process 1's files is reported alike and both fall back to step 1.
  assert r0["fallback_step"] == 1
  chex.assert_trees_all_equal(r0["fallback"], r0["saved"][1])
  skipped = [w for w in r0["warnings"] if w.startswith("skipping")]
  assert len(skipped) == 2
  assert "step 3" in skipped[0] and "SHA-256" in skipped[0] and "process_1" in skipped[0]
  assert "step 2" in skipped[1] and "file is missing" in skipped[1]
  assert "process_1" in skipped[1]
  assert r0["steps_after"] == [1]  # the damaged steps are gone; the run can save them again
  # Saved by one process on 4 devices, restored by two on 8.
  chex.assert_trees_all_equal(r0["from_single"], gather((p4, s4)))
  # Saved by two processes on 8 devices, restored by one on 4.
  manager = mc.make_checkpoint_manager(tmp_path / "mp" / "b")
  restored = mc.restore_checkpoint(manager, abstract(params4), abstract(state4))
  manager.close()
  chex.assert_trees_all_equal(gather(restored), r0["saved"][3])
  assert all(x.sharding.mesh.size == 4 for x in jax.tree.leaves(restored))
