"""Sharded Orbax checkpoints: exact round trip, bitwise resume, damaged steps, atomic manifests.

Eight host CPU devices (conftest.py), a ('data', 'model') mesh, MuonClip with
``mesh=`` (Muon, AdamW and QK-Clip states, MaskedNode leaves, a bf16 momentum).
Several processes: tests/test_multiprocess.py.
"""

import os

import chex
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from checkpoint_setup import abstract, setup  # tests/ is on sys.path

import muonclip_jax as mc
from muonclip_jax._checkpoint import MANIFEST


def _assert_same(a, b):
  chex.assert_trees_all_equal(a, b, strict=True)  # values, shapes and dtypes
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.sharding == y.sharding, (x.sharding, y.sharding)


def test_round_trip_is_exact(tmp_path):
  _, _, params, state, train_step = setup()
  params, state = train_step(params, state)
  manager = mc.make_checkpoint_manager(tmp_path / "ckpt")
  assert mc.save_checkpoint(manager, 1, params, state)
  rp, rs = mc.restore_checkpoint(manager, abstract(params), abstract(state))
  _assert_same(rp, params)
  _assert_same(rs, state)
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(rs))
  manager.close()


def test_resume_is_bitwise_equal_to_never_stopping(tmp_path):
  _, _, params, state, train_step = setup()
  p, s = params, state
  for _ in range(3):
    p, s = train_step(p, s)
  manager = mc.make_checkpoint_manager(tmp_path / "ckpt")
  mc.save_checkpoint(manager, 3, p, s)
  for _ in range(3):
    p, s = train_step(p, s)
  manager.close()

  # A fresh start: new optimizer, new jitted step, targets from a fresh init.
  _, _, params2, state2, train_step2 = setup()
  manager = mc.make_checkpoint_manager(tmp_path / "ckpt")
  rp, rs = mc.restore_checkpoint(manager, params2, state2)
  for _ in range(3):
    rp, rs = train_step2(rp, rs)
  _assert_same(rp, p)
  _assert_same(rs, s)
  assert train_step2._cache_size() == 1  # the restored state compiles to the same program
  manager.close()


def _largest_file(step_dir, item):
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / item) for f in fs]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "no_manifest"])
def test_damaged_latest_step_is_reported_and_previous_stays_usable(tmp_path, damage):
  _, _, params, state, train_step = setup()
  manager = mc.make_checkpoint_manager(tmp_path / "ckpt", max_to_keep=3)
  p3, s3 = params, state
  for _ in range(3):
    p3, s3 = train_step(p3, s3)
  mc.save_checkpoint(manager, 3, p3, s3)
  p6, s6 = p3, s3
  for _ in range(3):
    p6, s6 = train_step(p6, s6)
  mc.save_checkpoint(manager, 6, p6, s6)
  manager.wait_until_finished()

  step_dir = tmp_path / "ckpt" / "6"
  target = _largest_file(step_dir, "opt_state")
  if damage == "truncate":
    data = open(target, "rb").read()
    open(target, "wb").write(data[: len(data) // 2])
  elif damage == "delete":
    os.remove(target)
  elif damage == "flip":
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
  else:
    target = str(step_dir / MANIFEST)
    os.remove(target)

  with pytest.raises(mc.CheckpointError) as err:
    mc.restore_checkpoint(manager, params, state)
  assert err.value.step == 6
  assert err.value.path == target
  assert "step 6" in str(err.value) and target in str(err.value)

  with pytest.warns(RuntimeWarning, match="step 6"):
    step, rp, rs = mc.restore_latest_valid(manager, params, state)
  assert step == 3
  _assert_same(rp, p3)
  _assert_same(rs, s3)
  # The damaged step is gone, so the resumed run can save step 6 again.
  assert manager.all_steps() == [3]
  assert mc.save_checkpoint(manager, 6, p6, s6)
  manager.wait_until_finished()
  mc.verify_checkpoint(manager, 6)
  manager.close()


def test_no_checkpoint_is_a_clear_error(tmp_path):
  _, _, params, state, _ = setup()
  manager = mc.make_checkpoint_manager(tmp_path / "empty")
  with pytest.raises(mc.CheckpointError, match="no checkpoint"):
    mc.restore_checkpoint(manager, params, state)
  with pytest.raises(mc.CheckpointError, match="no usable checkpoint"):
    mc.restore_latest_valid(manager, params, state)
  manager.close()


def test_manifest_is_written_before_the_step_is_committed(tmp_path, monkeypatch):
  """The manifest lands in Orbax's temporary directory, so it commits with the step."""
  from muonclip_jax import _checkpoint
  seen = []
  real = _checkpoint.write_manifest
  monkeypatch.setattr(_checkpoint, "write_manifest",
                      lambda step, root: (seen.append((step, root.name,
                                                       (root.parent / str(step)).exists())),
                                          real(step, root)))
  _, _, params, state, _ = setup()
  manager = mc.make_checkpoint_manager(tmp_path / "ckpt")
  assert mc.save_checkpoint(manager, 1, params, state)
  manager.wait_until_finished()
  assert seen == [(1, "1" + ocp.step.TMP_DIR_SUFFIX, False)]
  mc.verify_checkpoint(manager, 1)
  manager.close()


def test_a_step_whose_finalisation_fails_is_never_visible(tmp_path, monkeypatch):
  """A save that dies before its commit (here: the manifest fails) leaves the previous step.

  Its temporary directory is deleted by the next manager, and the step number can
  be saved again.
  """
  from muonclip_jax import _checkpoint
  _, _, params, state, train_step = setup()
  manager = mc.make_checkpoint_manager(tmp_path / "ckpt")
  mc.save_checkpoint(manager, 1, params, state)
  p2, s2 = train_step(params, state)
  real = _checkpoint.write_manifest

  def dies(step, root):
    raise OSError("disk gone")

  monkeypatch.setattr(_checkpoint, "write_manifest", dies)
  mc.save_checkpoint(manager, 2, p2, s2)
  with pytest.raises(Exception, match="disk gone"):
    manager.wait_until_finished()
  monkeypatch.setattr(_checkpoint, "write_manifest", real)
  assert (tmp_path / "ckpt" / ("2" + ocp.step.TMP_DIR_SUFFIX)).exists()
  manager.close()

  manager = mc.make_checkpoint_manager(tmp_path / "ckpt")
  step, rp, _ = mc.restore_latest_valid(manager, params, state)
  assert step == 1 and manager.all_steps() == [1]
  _assert_same(rp, params)
  assert mc.save_checkpoint(manager, 2, p2, s2)
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2]
  assert not (tmp_path / "ckpt" / ("2" + ocp.step.TMP_DIR_SUFFIX)).exists()
  manager.close()


def test_an_orbax_manager_of_our_own_is_required(tmp_path):
  _, _, params, state, _ = setup()
  plain = ocp.CheckpointManager(tmp_path / "plain", item_names=("params", "opt_state"))
  with pytest.raises(TypeError, match="make_checkpoint_manager"):
    mc.save_checkpoint(plain, 1, params, state)
  plain.close()
  with pytest.raises(ValueError, match="max_to_keep"):
    mc.make_checkpoint_manager(tmp_path / "x", max_to_keep=0)
