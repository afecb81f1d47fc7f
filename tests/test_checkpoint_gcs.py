"""Checkpoints on ``gs://``, against a local GCS emulator (fake-gcs-server).

One emulator serves the whole session (fixture ``gcs``, tests/support/gcs_emulator.py);
every test writes under its own fresh prefix. etils/gcsfs (listings, the
manifest) and TensorStore (the arrays) both talk to it, as they would to GCS.
Damage is done through the storage API (``fsspec.filesystem("gcs")``), as a
bad write or another job would do it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import pytest
from support.checkpoint_setup import abstract, setup  # tests/ is on sys.path
from support.distributed import run_distributed
from support.gcs_emulator import gcs  # noqa: F401  (the session fixture)
from support.gcs_save_child import trees

import muonclip_jax as mc
from muonclip_jax._checkpoint import MANIFEST

ROOT = Path(__file__).resolve().parents[1]


def _fs():
  import fsspec
  fs = fsspec.filesystem("gcs")
  fs.invalidate_cache()
  return fs


def _bare(path) -> str:
  return os.fspath(path).removeprefix("gs://")


def _largest_object(fs, directory) -> str:
  sizes = fs.find(_bare(directory), detail=True)
  return "gs://" + max(sizes, key=lambda name: sizes[name]["size"])


def _tiny(step):
  params = {"w": jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * step,
            "b": jnp.full((8,), float(step), jnp.bfloat16)}
  return params, ({"count": jnp.asarray(step, jnp.int32)}, {"mu": jnp.ones((8, 8)) * step})


def test_round_trip_on_gs_is_exact_and_keeps_max_to_keep(gcs):  # noqa: F811
  _, _, params, state, train_step = setup()
  manager = mc.make_checkpoint_manager(gcs.prefix("round"), max_to_keep=2)
  p, s = params, state
  for step in (1, 2):
    assert mc.save_checkpoint(manager, step, p, s)  # asynchronous
    p, s = train_step(p, s)
  assert mc.save_checkpoint(manager, 3, p, s)
  rp, rs = mc.restore_checkpoint(manager, abstract(params), abstract(state))
  chex.assert_trees_all_equal((rp, rs), (p, s), strict=True)  # bit for bit, dtypes too
  for x, y in zip(jax.tree.leaves((rp, rs)), jax.tree.leaves((p, s))):
    assert x.sharding == y.sharding
  assert manager.all_steps() == [2, 3]
  manifest = json.loads((manager.step_path(3) / MANIFEST).read_text())
  fs = _fs()
  listed = {name.removeprefix(_bare(manager.step_path(3)) + "/")
            for name in fs.find(_bare(manager.step_path(3)))}
  assert set(manifest["files"]) == {n for n in listed if n.split("/")[0] in mc._checkpoint.ITEMS}
  assert all(fs.size(f"{_bare(manager.step_path(3))}/{rel}") == meta["size"]
             for rel, meta in manifest["files"].items())
  manager.close()


@pytest.mark.parametrize("damage", ["flip", "delete", "no_manifest", "truncate"])
def test_damage_on_gs_falls_back_and_deletes_only_proven_damage(gcs, damage):  # noqa: F811
  manager = mc.make_checkpoint_manager(gcs.prefix(damage), max_to_keep=3)
  for step in (1, 2):
    assert mc.save_checkpoint(manager, step, *_tiny(step))
  manager.wait_until_finished()
  # A listing through epath: gcsfs caches it, and without care an object deleted
  # after it still "exists" with its old size, and reading it raises FileNotFoundError.
  assert list((manager.step_path(2) / "opt_state").iterdir())
  fs = _fs()
  target = _largest_object(fs, manager.step_path(2) / "opt_state")
  if damage == "flip":
    data = bytearray(fs.cat(_bare(target)))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(_bare(target), bytes(data))
  elif damage == "delete":  # after the listing above: a stale listing must not matter
    fs.rm(_bare(target))
  elif damage == "truncate":
    fs.pipe(_bare(target), fs.cat(_bare(target))[:5])
  else:
    target = os.fspath(manager.step_path(2) / MANIFEST)
    fs.rm(_bare(target))

  with pytest.raises(mc.CheckpointError) as err:
    mc.restore_checkpoint(manager, *_tiny(0))
  assert err.value.step == 2 and err.value.path == target
  assert err.value.damaged == (damage != "no_manifest")
  with pytest.warns(RuntimeWarning, match="step 2"):
    step, rp, rs = mc.restore_latest_valid(manager, *_tiny(0))
  assert step == 1
  chex.assert_trees_all_equal((rp, rs), _tiny(1), strict=True)
  assert manager.all_steps() == ([1, 2] if damage == "no_manifest" else [1])
  manager.close()


def test_a_sigkill_mid_save_on_gs_leaves_the_previous_step(gcs):  # noqa: F811
  """The child is killed as soon as objects of step 2 appear, long before its commit."""
  root = gcs.prefix("kill")
  child_script = ROOT / "tests" / "support" / "gcs_save_child.py"
  child = subprocess.Popen([sys.executable, str(child_script), root,
                            "64"], stdout=subprocess.PIPE, text=True, start_new_session=True,
                           cwd=ROOT)
  # Reading the child's output blocks; a child stuck before it prints is SIGKILLed,
  # so the loop ends (EOF) and the test fails below instead of hanging.
  watchdog = threading.Timer(120, os.killpg, (child.pid, signal.SIGKILL))
  watchdog.start()
  try:
    for line in child.stdout:
      if line.startswith("saving 2"):
        break
    fs, step2, deadline = _fs(), f"{_bare(root)}/2/", time.monotonic() + 30
    while not any(o.startswith(step2) for o in fs.find(_bare(root))):
      assert time.monotonic() < deadline, "the child wrote nothing of step 2 in 30 s"
      fs.invalidate_cache()
      time.sleep(0.01)
  finally:
    watchdog.cancel()
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
  assert child.stdout.read() == ""  # killed before "saved 2"
  fs.invalidate_cache()
  assert not fs.exists(step2 + "commit_success.txt")
  assert fs.find(step2)  # partial objects of step 2 are there

  manager = mc.make_checkpoint_manager(root)
  assert manager.all_steps() == [1]
  step, rp, rs = mc.restore_latest_valid(manager, *trees(1, 0))
  assert step == 1
  chex.assert_trees_all_equal((rp, rs), trees(1, 0), strict=True)
  deadline = time.monotonic() + 10  # the manager deletes them in the background
  while fs.find(step2):
    assert time.monotonic() < deadline, f"temporary objects left: {fs.find(step2)[:3]}"
    time.sleep(0.1)
    fs.invalidate_cache()
  assert mc.save_checkpoint(manager, 2, *trees(2, 0))  # the step can be saved again
  manager.wait_until_finished()
  mc.verify_checkpoint(manager, 2)
  manager.close()


def test_two_processes_save_and_restore_on_gs(gcs, tmp_path):  # noqa: F811
  r0, r1 = run_distributed("support.workers_gcs:round_trip", tmp_path=tmp_path, timeout=90,
                           args={"root": gcs.prefix("mp")})
  for r in (r0, r1):
    assert r["step"] == 2 and r["steps"] == [1, 2]
    chex.assert_trees_all_equal(r["restored"], r["saved"])


def test_cli_saves_to_gs_and_resumes(gcs, tmp_path, capsys):  # noqa: F811
  """``python -m examples.lm.train --ckpt-dir gs://... [--resume]``, through its main()."""
  from examples.lm import train as train_lm
  ckpt = gcs.prefix("cli")
  # AdamW compiles fastest; the checkpoint path is the same for every optimizer, and
  # MuonClip's state on gs:// is the round-trip test's.
  common = ["--optimizer", "adamw", "--batch", "4", "--seq-len", "16", "--d-model", "32",
            "--layers", "1", "--heads", "2", "--eval-every", "100", "--eval-batches", "1",
            "--max-bytes", "65536", "--no-progress", "--ckpt-dir", ckpt, "--ckpt-every", "1"]
  first = train_lm.main(common + ["--steps", "3", "--out", str(tmp_path / "a")])
  assert first["steps"] == 3
  # Steps 2 and 3 kept (max_to_keep=2), each with its manifest.
  assert {o.split("/")[-2] for o in _fs().find(_bare(ckpt)) if o.endswith(MANIFEST)} == {"2", "3"}
  # The resumed run (same process: a fresh manager, trainer and compiled step).
  second = train_lm.main(common + ["--steps", "4", "--resume", "--out", str(tmp_path / "b")])
  assert second["steps"] == 4
  assert "resumed from step 3" in capsys.readouterr().out
  a = json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]["loss"]
  b = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]["loss"]
  assert len(b) == 4 and b[:3] == a  # it went on from step 3, with the same losses
