"""End-to-end checks of examples/: the NNX training library, the CLI and the linen example.

Tiny settings throughout (d_model 32, one or two layers, 16-byte sequences).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

import muonclip_jax  # noqa: E402
from examples import lm, train_linen, train_nnx  # noqa: E402
from examples.lm import train as train_lm  # noqa: E402

TINY = lm.ModelConfig(d_model=32, num_layers=2, num_heads=4)
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data() -> lm.ByteData:
  return lm.ByteData(lm.default_corpus(1 << 16), seq_len=16)


def tiny_run(name: str, *, tau: float = 100.0, lr: float = 0.01, weight_decay: float = 0.1,
             steps: int = 6, model: lm.ModelConfig = TINY,
             mesh: tuple[int, int] | None = None, seed: int = 0) -> lm.RunConfig:
  optim = lm.OptimConfig(name=name, lr=lr, tau=tau, weight_decay=weight_decay, warmup=2,
                         total_steps=steps)
  return lm.RunConfig(
      model=model, optim=optim,
      steps=steps, batch=4, seq_len=16, seed=seed, eval_every=3, eval_batches=2, mesh=mesh)


def test_default_corpus_is_deterministic_and_split(data: lm.ByteData) -> None:
  a = lm.default_corpus(1 << 16)
  assert a == lm.default_corpus(1 << 16)
  assert len(a) == 1 << 16 and a.startswith(b"# file: ")
  assert len(data.train) + len(data.val) == len(a)
  assert data.val.tobytes() == a[len(data.train):]
  x1, y1 = data.train_batch(3, 7, 4)
  x2, y2 = data.train_batch(3, 7, 4)
  np.testing.assert_array_equal(x1, x2)
  np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])  # targets are shifted inputs
  assert not np.array_equal(x1, data.train_batch(3, 8, 4)[0])
  assert x1.shape == (4, 16) and x1.dtype == np.int32


def test_text_file_and_too_short(tmp_path: Path) -> None:
  f = tmp_path / "t.txt"
  f.write_bytes(b"hello world " * 100)
  assert lm.load_text(f) == b"hello world " * 100
  with pytest.raises(ValueError, match="validation split"):
    lm.ByteData(b"abc" * 10, seq_len=16)


def test_routing_puts_embedding_and_head_on_adamw() -> None:
  _, params = lm.init_model(TINY, 0)
  labels = muonclip_jax.default_param_labels(params)
  assert labels["embed"]["embedding"] == "adamw"
  assert labels["lm_head"]["kernel"] == "adamw"
  assert labels["final_norm"]["scale"] == "adamw"
  block = labels["blocks"][0]
  assert block["attn_norm"]["scale"] == block["mlp_norm"]["scale"] == "adamw"
  for name in ("query", "key", "value", "out"):
    assert block["attn"][name]["kernel"] == "muon"
  assert block["fc_in"]["kernel"] == block["fc_out"]["kernel"] == "muon"


@pytest.mark.parametrize("name", ["muonclip", "muon", "adamw"])
def test_training_lowers_loss_and_compiles_once(name: str, data: lm.ByteData) -> None:
  trainer = lm.Trainer(tiny_run(name, steps=12), data)
  m = trainer.run()
  assert m["val_step"] == [0, 3, 6, 9, 12]
  assert len(m["loss"]) == 12 and np.all(np.isfinite(m["loss"]))
  assert np.asarray(m["head_max_logit"]).shape == (12, 2, 4)
  assert m["val_loss"][-1] < m["val_loss"][0] - 0.5  # ~5.6 nats at init
  assert trainer._train_step._cache_size() == 1  # fixed shapes: one compilation


def _post_step_logits(trainer: lm.Trainer, step: int) -> np.ndarray:
  x, _ = trainer.batch(step)
  _, stats = lm.apply_model(trainer.graphdef, trainer.params, x)
  return np.asarray(lm.head_max_logits(stats, trainer.cfg.model.num_layers))


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_qk_clip_finds_every_head_of_the_model(kv_heads: int | None,
                                               data: lm.ByteData) -> None:
  """With a zero update, a MuonClip step turns each head's max logit into min(S, tau).

  Learning rate and weight decay 0 isolate QK-Clip. For each layer, the
  original parameters with that layer's new query/key kernels give, on the same
  batch, ``tau`` in every head that exceeded it and the old value elsewhere;
  this holds only if QK-Clip found every layer's kernels (MHA, GQA, MQA).
  """
  model = lm.ModelConfig(d_model=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads)
  graphdef, params = lm.init_model(model, 0)
  x0, _ = data.train_batch(0, 0, 4)
  _, stats0 = lm.apply_model(graphdef, params, jnp.asarray(x0))
  tau = float(np.median(lm.head_max_logits(stats0, 2)))  # half the heads exceed tau
  trainer = lm.Trainer(tiny_run("muonclip", tau=tau, lr=0.0, weight_decay=0.0, model=model),
                       data)
  old = jax.tree.map(np.array, trainer.params)
  _, before = trainer.train_step()
  clipped = before > tau
  assert clipped.any() and not clipped.all()
  x, _ = trainer.batch(0)
  for layer in range(model.num_layers):
    hybrid = jax.tree.map(np.array, old)
    for name in ("query", "key"):
      hybrid["blocks"][layer]["attn"][name] = jax.tree.map(
          np.array, trainer.params["blocks"][layer]["attn"][name])
    _, stats = lm.apply_model(trainer.graphdef, hybrid, x)
    after = np.asarray(stats["blocks"][layer]["attn"]["max_logits"])
    np.testing.assert_allclose(after, np.minimum(before[layer], tau), rtol=1e-4)
  info = lm.clip_telemetry(trainer.opt_state)
  assert info["num_clipped"] == int(clipped.sum())
  key_shape = trainer.params["blocks"][0]["attn"]["key"]["kernel"].shape
  assert key_shape == (32, model.kv_heads, 8)


def test_plain_muon_does_not_clip(data: lm.ByteData) -> None:
  trainer = lm.Trainer(tiny_run("muon"), data)
  _, before = trainer.train_step()
  assert before.max() > 1.0
  assert lm.clip_telemetry(trainer.opt_state) == {}


def test_resume_is_exact(tmp_path: Path, data: lm.ByteData) -> None:
  cfg = tiny_run("muonclip", tau=2.0, steps=6)
  full = lm.Trainer(cfg, data)
  full.run()
  first = lm.Trainer(cfg, data)
  first.run(steps=3)
  ckpt = lm.Checkpointer(tmp_path / "ck")
  ckpt.save(first)
  ckpt.close()
  resumed = lm.Trainer(cfg, data)
  ckpt = lm.Checkpointer(tmp_path / "ck")
  assert ckpt.restore_latest(resumed) == 3
  ckpt.close()
  assert resumed.step == 3 and resumed.metrics["loss"] == first.metrics["loss"]
  resumed.run()
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed.metrics["loss"] == full.metrics["loss"]


def test_mesh_run_matches_single_device(data: lm.ByteData) -> None:
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 host devices (tests/conftest.py sets 8)")
  single = lm.Trainer(tiny_run("muonclip", tau=2.0, steps=4), data)
  single.run()
  sharded = lm.Trainer(tiny_run("muonclip", tau=2.0, steps=4, mesh=(4, 1)), data)
  sharded.run()
  emb = sharded.params["blocks"][0]["fc_in"]["kernel"]
  assert len(emb.sharding.device_set) == 4
  # Outputs keep the inputs' layout (norm scales included): one compilation.
  assert sharded._train_step._cache_size() == 1
  np.testing.assert_allclose(sharded.metrics["loss"], single.metrics["loss"], rtol=2e-3)


@pytest.mark.parametrize("name", ["muonclip", "muon", "adamw"])
def test_cli_writes_metrics_and_plots(name: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
  out = tmp_path / name
  summary = train_lm.main([
      "--optimizer", name, "--steps", "4", "--batch", "4", "--seq-len", "16",
      "--d-model", "32", "--layers", "1", "--heads", "2", "--eval-every", "2",
      "--eval-batches", "1", "--max-bytes", "65536", "--out", str(out), "--no-progress",
      "--tau", "3"])
  doc = json.loads((out / "metrics.json").read_text())
  assert doc["config"]["optim"]["name"] == name
  assert len(doc["metrics"]["loss"]) == 4 and doc["metrics"]["val_step"] == [0, 2, 4]
  assert summary["final_val_loss"] == doc["metrics"]["val_loss"][-1]
  csv = (out / "metrics.csv").read_text().splitlines()
  assert csv[0].startswith("step,loss,lr,val_loss,max_logit_layer0") and len(csv) == 5
  for png in ("loss.png", "max_logit.png"):
    assert (out / png).read_bytes()[:8] == PNG
  report = capsys.readouterr().out.strip().splitlines()[-1]
  assert report == lm.qk_clip_report(name, 3.0, summary["max_logit"],
                                     summary.get("clipped_heads_total"), plot="max_logit.png")
  if name == "muonclip":
    assert summary["clipped_heads_total"] >= 0
    assert "QK-Clip: " in report and "tau = 3" in report
  else:
    assert report.startswith(f"QK-Clip: off ({name})")


def test_nnx_loop_clips_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
  """The copyable NNX loop: QK-Clip acts at a low tau, and the last line says so."""
  tiny = ["--steps", "4", "--batch", "4", "--seq-len", "16", "--d-model", "32",
          "--layers", "1", "--heads", "2", "--log-every", "2"]
  out = train_nnx.main(tiny + ["--tau", "0.5"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert out["clipped"] > 0 and out["max_logit"] > 0.5
  assert lines[-1].startswith(f"QK-Clip: {out['clipped']} head-steps clipped to tau = 0.5")
  assert [x.split()[1] for x in lines[:-1]] == ["2", "4"]  # a line every --log-every steps
  out = train_nnx.main(tiny + ["--optimizer", "adamw"])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("QK-Clip: off (adamw); the largest attention logit reached ")
  assert out["clipped"] == 0


def test_qk_clip_report_says_what_happened_and_how_to_see_it() -> None:
  below = lm.qk_clip_report("muonclip", 100.0, 27.6, 0)
  assert below == ("QK-Clip: max logit 27.6 stayed below tau = 100, no head clipped. "
                   "To see clipping, lower tau below it (e.g. --tau 14).")
  assert "12 head-steps clipped to tau = 20" in lm.qk_clip_report("muonclip", 20.0,
                                                                        31.0, 12)
  assert "--optimizer muonclip" in lm.qk_clip_report("muon", 100.0, 50.0, None)


def test_cli_checkpoint_and_resume(tmp_path: Path) -> None:
  common = ["--steps", "4", "--batch", "4", "--seq-len", "16", "--d-model", "32",
            "--layers", "1", "--heads", "2", "--eval-every", "2", "--eval-batches", "1",
            "--max-bytes", "65536", "--no-progress", "--ckpt-dir", str(tmp_path / "ck"),
            "--ckpt-every", "2"]
  a = train_lm.main(common + ["--out", str(tmp_path / "a")])
  assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["2", "4"]
  b = train_lm.main(common + ["--out", str(tmp_path / "b"), "--steps", "6", "--resume"])
  doc = json.loads((tmp_path / "b" / "metrics.json").read_text())
  assert b["steps"] == 6 and len(doc["metrics"]["loss"]) == 6
  assert doc["metrics"]["loss"][:4] == json.loads(
      (tmp_path / "a" / "metrics.json").read_text())["metrics"]["loss"]
  assert a["steps"] == 4


def test_cli_as_a_script_with_a_mesh(tmp_path: Path) -> None:
  """``python -m examples.lm.train --mesh 2x1`` sets the host device count itself."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "examples.lm.train", "--mesh", "2x1", "--steps", "2",
       "--batch", "4", "--seq-len", "16", "--d-model", "32", "--layers", "1", "--heads", "2",
       "--eval-every", "2", "--eval-batches", "1", "--max-bytes", "65536",
       "--out", str(tmp_path), "--no-progress"],
      capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 device(s), mesh 2x1" in proc.stdout
  assert (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("name", ["muonclip", "adamw"])
def test_linen_example(name: str) -> None:
  out = train_linen.main(["--optimizer", name, "--steps", "8", "--batch", "4",
                          "--seq-len", "16", "--tau", "2.0"])
  assert out["last_loss"] < out["first_loss"] - 0.5
  if name == "muonclip":
    # Clipped after every step; the next batch's max logit stays near tau.
    assert out["max_logit"] < 2.0 * 1.5


def test_linen_step_clips_to_tau() -> None:
  model = train_linen.LinenLM(d_model=32, num_layers=1, num_heads=2, seq_len=16)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16)), jnp.int32)
  params = model.init(jax.random.key(0), x)["params"]
  tau = 0.5
  tx = muonclip_jax.muonclip(0.0, tau=tau, weight_decay=0.0)  # isolate QK-Clip
  step = train_linen.make_train_step(model, tx)
  params, _, _, before = step(params, tx.init(params), x, jnp.roll(x, -1, axis=1))
  assert float(before) > tau
  _, state = model.apply({"params": params}, x, mutable=["intermediates"])
  after = max(float(jnp.max(v)) for v in jax.tree.leaves(state["intermediates"]))
  np.testing.assert_allclose(after, tau, rtol=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "h:1"], "go together"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "process-id"),
    (["--multihost", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"],
     "--multihost"),
    (["--mesh", "3x1", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "0"],
     "multiple of the 2 processes"),
])
def test_cli_rejects_inconsistent_multi_process_flags(flags: list[str], message: str) -> None:
  with pytest.raises(SystemExit, match=message):
    train_lm.main(flags)


TINY_CLI = ["--steps", "6", "--batch", "4", "--seq-len", "16", "--d-model", "32",
            "--layers", "1", "--heads", "2", "--eval-every", "2", "--eval-batches", "1",
            "--max-bytes", "65536", "--no-progress"]


@pytest.mark.parametrize("flag, value, expected", [
    ("--lr", "nan", "a finite number > 0"), ("--lr", "inf", "a finite number > 0"),
    ("--lr", "0", "a finite number > 0"), ("--lr", "-0.1", "a finite number > 0"),
    ("--tau", "nan", "a finite number > 0"), ("--weight-decay", "nan", "a finite number >= 0"),
    ("--seq-len", "0", "an integer >= 1"), ("--batch", "-4", "an integer >= 1"),
    ("--d-model", "0", "an integer >= 1"), ("--steps", "0", "an integer >= 1"),
    ("--ckpt-every", "0", "an integer >= 1"), ("--eval-every", "0", "an integer >= 1"),
])
def test_cli_refuses_bad_numbers_when_parsing(flag, value, expected, tmp_path, capsys,
                                              monkeypatch) -> None:
  """Refused by argparse (exit status 2), before any model is built or step run."""
  monkeypatch.setattr(lm.trainer, "Trainer", None)  # reaching training would raise TypeError
  with pytest.raises(SystemExit) as e:
    train_lm.main(TINY_CLI + ["--ckpt-dir", str(tmp_path / "ck"), flag, value])
  assert e.value.code == 2
  assert f"argument {flag}: expected {expected}, got" in capsys.readouterr().err
  assert not (tmp_path / "ck").exists()


def test_cli_says_a_diverged_run_diverged_and_exits_1(tmp_path, capsys) -> None:
  """A NaN loss ends with 'Diverged', not 'max logit ... stayed below tau', exit 1, and
  no checkpoint of the NaN state."""
  with pytest.raises(SystemExit) as e:
    train_lm.main(TINY_CLI + ["--lr", "1e30", "--ckpt-dir", str(tmp_path / "ck"),
                              "--ckpt-every", "1", "--out", str(tmp_path / "out")])
  assert e.value.code == 1
  out = capsys.readouterr().out
  last = out.strip().splitlines()[-1]
  assert last.startswith("Diverged: the loss or a max logit became non-finite") and \
      "stayed below" not in out
  doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
  bad = doc["summary"]["diverged_at_step"]
  losses = doc["metrics"]["loss"]
  assert not np.isfinite(losses[-1]) or not np.all(np.isfinite(doc["metrics"]["max_logit"][-1]))
  assert len(losses) == bad + 1 and np.all(np.isfinite(losses[:bad]))  # stopped there
  saved = sorted(int(p.name) for p in (tmp_path / "ck").iterdir() if p.name.isdigit())
  assert saved and max(saved) <= bad  # steps 1..bad: the states before the NaN


@pytest.mark.parametrize("script", ["train_nnx", "train_linen"])
def test_examples_refuse_bad_numbers_and_stop_on_nan(script, capsys) -> None:
  module = {"train_nnx": train_nnx, "train_linen": train_linen}[script]
  for flag, value in (("--lr", "nan"), ("--seq-len", "0"), ("--steps", "-1")):
    with pytest.raises(SystemExit) as e:
      module.main([flag, value])
    assert e.value.code == 2 and f"argument {flag}: expected" in capsys.readouterr().err
  tiny = ["--steps", "4", "--batch", "4", "--seq-len", "16", "--lr", "1e30"]
  if script == "train_nnx":
    tiny += ["--d-model", "32", "--layers", "1", "--heads", "2", "--log-every", "1"]
  with pytest.raises(SystemExit, match=r"^Diverged: the loss is nan at step \d+; lower --lr"):
    module.main(tiny)
  assert "stayed below" not in capsys.readouterr().out
