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
from etils import epath
from support.checkpoint_setup import abstract, setup  # tests/ is on sys.path

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

  assert err.value.damaged == (damage != "no_manifest")

  with pytest.warns(RuntimeWarning, match="step 6") as caught:
    step, rp, rs = mc.restore_latest_valid(manager, params, state)
  assert step == 3
  _assert_same(rp, p3)
  _assert_same(rs, s3)
  messages = " ".join(str(w.message) for w in caught)
  if damage == "no_manifest":
    # Nothing proves the data damaged: the step is kept, and the warning says so.
    assert "KEPT" in messages and "deleting" not in messages
    assert manager.all_steps() == [3, 6]
    assert not mc.save_checkpoint(manager, 6, p6, s6)  # Orbax's rule, as the warning says
  else:
    # The manifest proves it damaged: it is gone, so the resumed run can save step 6 again.
    assert "proves it damaged" in messages and "deleting checkpoint step 6" in messages
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


# --------------------------------------------------------------------------
# Nothing intact is deleted; bad input is refused before anything is touched.


def _tiny(scale=1.0, dtype=jnp.float32, n=4):
  """Small single-device trees: enough for the rules below, quick to save."""
  params = {"w": jnp.arange(n * n, dtype=dtype).reshape(n, n) * scale,
            "b": {"c": jnp.full((n,), scale, dtype)}}
  state = ({"count": jnp.asarray(int(scale), jnp.int32)}, {"mu": jnp.ones((n, n)) * scale})
  return params, state


def _two_steps(tmp_path):
  manager = mc.make_checkpoint_manager(tmp_path / "ckpt", max_to_keep=3)
  trees = {1: _tiny(1.0), 2: _tiny(2.0)}
  for step, (p, s) in trees.items():
    assert mc.save_checkpoint(manager, step, p, s)
  manager.wait_until_finished()
  return manager, trees


def test_a_one_off_io_error_is_retried_and_the_newest_step_restored(tmp_path, monkeypatch):
  manager, trees = _two_steps(tmp_path)
  real, calls = manager.restore, []

  def flaky(step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 1:
      raise OSError(5, "Input/output error (injected, once)")
    return real(step, *args, **kwargs)

  monkeypatch.setattr(manager, "restore", flaky)
  with pytest.warns(RuntimeWarning, match="retrying") as caught:
    step, rp, rs = mc.restore_latest_valid(manager, *trees[1], backoff_s=0.01)
  assert step == 2 and calls == [2, 2]
  chex.assert_trees_all_equal((rp, rs), trees[2])
  assert manager.all_steps() == [1, 2]
  assert not any("deleting" in str(w.message) or "skipping" in str(w.message) for w in caught)
  manager.close()


def test_a_lasting_io_error_on_an_intact_step_raises_and_deletes_nothing(tmp_path, monkeypatch):
  manager, trees = _two_steps(tmp_path)
  real, calls = manager.restore, []

  def broken(step, *args, **kwargs):
    calls.append(step)
    if step == 2:
      raise ConnectionResetError("storage unreachable (injected)")
    return real(step, *args, **kwargs)

  monkeypatch.setattr(manager, "restore", broken)
  with pytest.warns(RuntimeWarning, match="retrying"):
    with pytest.raises(mc.CheckpointError, match="step 2.*tried 3 times.*neither skipped") as e:
      mc.restore_latest_valid(manager, *trees[1], retries=2, backoff_s=0.01)
  assert e.value.step == 2 and not e.value.damaged
  assert calls == [2, 2, 2]  # never fell back to step 1
  assert manager.all_steps() == [1, 2]
  # A logic error is not retried.
  monkeypatch.setattr(manager, "restore", lambda step, *a, **k: calls.append(step) or 1 / 0)
  calls.clear()
  with pytest.raises(mc.CheckpointError, match="step 2.*ZeroDivisionError"):
    mc.restore_latest_valid(manager, *trees[1], backoff_s=0.01)
  assert calls == [2] and manager.all_steps() == [1, 2]
  manager.close()


@pytest.mark.parametrize("change", ["shape", "dtype", "extra_leaf", "missing_leaf"])
def test_targets_unlike_the_saved_arrays_are_refused_before_anything_is_touched(
    tmp_path, monkeypatch, change):
  manager, trees = _two_steps(tmp_path)
  step_dir_2 = manager.step_path(2)
  # Step 2 damaged: a fallback would delete it. A mismatch must raise before that.
  os.remove(_largest_file(step_dir_2, "params"))
  p, s = trees[1]
  if change == "shape":  # another model size
    p, s = _tiny(1.0, n=8)
    match = r"params_like\['b'\]\['c'\]: checkpoint step 1 holds shape \(4,\) float32, " \
            r"the target is shape \(8,\) float32"
  elif change == "dtype":  # float32 saved, int32 target: Orbax would cast (zeros)
    p = {**p, "w": p["w"].astype(jnp.int32)}
    match = r"params_like\['w'\]: .* shape \(4, 4\) float32, the target is shape \(4, 4\) int32"
  elif change == "extra_leaf":
    p = {**p, "extra": jnp.zeros(3)}
    match = r"params_like\['extra'\]: checkpoint step 1 has no such leaf"
  else:
    s = (s[0], {})
    match = r"opt_state_like: checkpoint step 1 holds opt_state leaf '1.mu'"
  restores = []
  monkeypatch.setattr(manager, "restore", lambda *a, **k: restores.append(a))
  # Step 2 is skipped as damaged, then step 1's targets are refused: nothing deleted.
  with pytest.warns(RuntimeWarning, match="step 2.*proves it damaged"), \
       pytest.raises(ValueError, match=match) as e:
    mc.restore_latest_valid(manager, p, s)
  assert "same model and optimizer flags" in str(e.value)
  with pytest.raises(ValueError, match=match):
    mc.restore_checkpoint(manager, p, s, step=1)
  assert restores == [] and manager.all_steps() == [1, 2]
  manager.close()


def test_a_file_gone_from_a_stale_listing_is_a_missing_file(tmp_path, monkeypatch):
  """gcsfs caches listings: a file listed, then gone, raises FileNotFoundError on stat."""
  manager, trees = _two_steps(tmp_path)
  victim = _largest_file(manager.step_path(2), "opt_state")
  real_stat = type(manager.step_path(2)).stat

  def stat(self):
    if os.fspath(self) == victim:
      raise FileNotFoundError(victim)
    return real_stat(self)

  monkeypatch.setattr(type(manager.step_path(2)), "stat", stat)
  with pytest.raises(mc.CheckpointError, match="file is missing") as e:
    mc.verify_checkpoint(manager, 2)
  assert e.value.damaged and e.value.path == victim
  with pytest.warns(RuntimeWarning, match="step 2"):
    step, rp, rs = mc.restore_latest_valid(manager, *trees[1])
  assert step == 1
  chex.assert_trees_all_equal((rp, rs), trees[1])
  manager.close()


def test_non_array_leaves_are_refused_at_save(tmp_path):
  manager = mc.make_checkpoint_manager(tmp_path / "ckpt")
  p, s = _tiny()
  with pytest.raises(TypeError, match=r"opt_state\[0\]\['step'\]: a int leaf .*jnp.asarray"):
    mc.save_checkpoint(manager, 1, p, (({**s[0], "step": 3}), s[1]))
  with pytest.raises(TypeError, match=r"params\['name'\]: a str leaf"):
    mc.save_checkpoint(manager, 1, {**p, "name": "x"}, s)
  manager.wait_until_finished()
  assert manager.all_steps() == [] and os.listdir(tmp_path / "ckpt") == []
  # The same tree with arrays saves and restores.
  assert mc.save_checkpoint(manager, 1, p, ({**s[0], "step": jnp.asarray(3)}, s[1]))
  rp, rs = mc.restore_checkpoint(manager, p, ({**s[0], "step": jnp.asarray(0)}, s[1]))
  assert int(rs[0]["step"]) == 3
  with pytest.raises(TypeError, match=r"opt_state_like\[0\]\['step'\]: a int leaf"):
    mc.restore_checkpoint(manager, p, ({**s[0], "step": 0}, s[1]))
  manager.close()


def test_unusable_directories_are_refused_up_front(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"directory: empty path ''.*gs://BUCKET/PATH"):
    mc.make_checkpoint_manager("")
  assert os.listdir(tmp_path) == []  # no temporary directory left in the cwd
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ValueError, match=r"directory: '.*afile' is an existing file"):
    mc.make_checkpoint_manager(tmp_path / "afile")
  with pytest.raises(ValueError, match=r"directory: 's3://b/run' uses the scheme 's3://'.*"
                                       r"gs://BUCKET/PATH"):
    mc.make_checkpoint_manager("s3://b/run")
  with pytest.raises(ValueError, match="names no bucket"):
    mc.make_checkpoint_manager("gs:///run")
  assert sorted(os.listdir(tmp_path)) == ["afile"]
  # A relative path is made absolute (Orbax needs one).
  manager = mc.make_checkpoint_manager("rel")
  assert manager.directory == epath.Path(tmp_path / "rel")
  manager.close()


def test_retry_arguments_are_checked(tmp_path):
  manager, trees = _two_steps(tmp_path)
  with pytest.raises(ValueError, match="retries"):
    mc.restore_checkpoint(manager, *trees[2], retries=-1)
  with pytest.raises(ValueError, match="backoff_s"):
    mc.restore_latest_valid(manager, *trees[2], backoff_s=float("nan"))
  manager.close()


def test_verify_false_skips_the_manifest_and_its_docstring_says_what_that_costs(tmp_path):
  manager, trees = _two_steps(tmp_path)
  victim = _largest_file(manager.step_path(2), "params")
  data = bytearray(open(victim, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(victim, "wb").write(bytes(data))
  with pytest.raises(mc.CheckpointError, match="contents changed"):
    mc.restore_checkpoint(manager, *trees[2])
  doc = " ".join(mc.restore_checkpoint.__doc__.split())
  assert "``verify=False`` skips all of that" in doc and "without any error" in doc
  manager.close()
