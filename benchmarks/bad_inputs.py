"""Every bad input of issue 15 (section 4), tried: clear error, right answer, silent, or lost?

Each row of the issue's table is tried with each of its inputs, in its own
``try``/``except`` (a crash in one does not stop the others), and classified:

* **clear error**: an exception whose message names the argument (or the
  parameter path, or the flag) it is about;
* **right answer**: no error, and the result equals an independent reference
  (brute-force attention, the boolean-mask result, the saved values);
* **as documented**: no error and a result the reference does not confirm,
  but the function's docstring says so (``restore_checkpoint(verify=False)``);
* **silent**: no error and a wrong or unconfirmed result;
* **lost**: an intact checkpoint step was removed;
* **unclear error**: an exception that does not name the argument, or that
  came too late (after training started);
* **not run**: this script itself failed on the row (reported, not counted).

It prints a markdown table and the totals line ``tried N, clear error N, right
answer N, silent N, lost N`` (other classes appended when they occur), and
writes both to ``benchmarks/RESULTS.md`` under ``## bad_inputs``.

Run: ``python -m benchmarks.bad_inputs [--no-write] [--only SUBSTRING ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CLEAR, RIGHT, DOCUMENTED, SILENT, LOST, UNCLEAR, NOT_RUN = (
    "clear error", "right answer", "as documented", "silent", "lost", "unclear error",
    "not run")


class Result(NamedTuple):
  """One input tried."""

  call: str
  bad_input: str
  outcome: str
  detail: str


def _short(text: str, n: int = 160) -> str:
  text = " ".join(str(text).split()).replace("|", "/")
  return text if len(text) <= n else text[:n - 3] + "..."


def _error(e: BaseException, names: Sequence[str]) -> tuple[str, str]:
  """An exception: clear if its message names every one of ``names``."""
  msg = str(e)
  outcome = CLEAR if all(n in msg for n in names) else UNCLEAR
  return outcome, f"{type(e).__name__}: {_short(msg)}"


def _expect(fn: Callable[[], Any], check: Callable[[Any], bool] | None,
            names: Sequence[str]) -> tuple[str, str]:
  """Calls ``fn``: an error is clear or unclear; a result is right only if ``check`` says so."""
  try:
    result = fn()
  except Exception as e:  # noqa: BLE001 - every failure is an outcome here
    return _error(e, names)
  if check is not None and check(result):
    return RIGHT, "matches the reference"
  return SILENT, "returned without an error" + ("" if check is None else
                                                ", and not the reference's result")


# -- attention ------------------------------------------------------------------------

B, T, H, D = 2, 64, 2, 32


def _qkv(q_len: int = T, kv_len: int = T) -> tuple[jax.Array, jax.Array, jax.Array]:
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, q_len, H, D)) * 2, jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, kv_len, H, D)) * 2, jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, kv_len, H, D)), jnp.float32)
  return q, k, v


def _brute_max(q: jax.Array, k: jax.Array, causal: bool = False) -> np.ndarray:
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  if causal:
    keep = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    logits = jnp.where(keep, logits, -jnp.inf)
  return np.asarray(jnp.max(logits, axis=(0, 2, 3)))


def _sown(fn: Callable[..., jax.Array], *args: Any, **kwargs: Any) -> tuple[Any, Any]:
  """``fn(..., module=m)`` inside a linen module: output and the sown statistic."""
  from flax import linen as nn

  class Sow(nn.Module):
    @nn.compact
    def __call__(self, *a):
      return fn(*a, module=self, **kwargs)

  out, state = Sow().apply({}, *args, mutable=["intermediates"])
  return np.asarray(out), np.asarray(state["intermediates"]["max_logits"])


def _attention_ok(got: tuple[Any, Any], q: jax.Array, k: jax.Array, v: jax.Array,
                  causal: bool = False, mask: jax.Array | None = None) -> bool:
  import muonclip_jax as mc
  out, stat = got
  want = np.asarray(mc.dot_product_attention(q, k, v, mask=mask, is_causal=causal))
  return bool(np.allclose(out, want, atol=2e-5, rtol=1e-4)
              and np.allclose(stat, _brute_max(q, k, causal), rtol=1e-3))


def soft_cap(cap: float) -> tuple[str, str]:
  import muonclip_jax as mc
  q, k, v = _qkv()
  fa = functools.partial(mc.flash_attention, implementation="xla", logit_soft_cap=cap)
  # No cap value is right for 0 / negative / nan; for inf the only sane reading is
  # "no cap": compared against the uncapped attention.
  return _expect(lambda: _sown(fa, q, k, v), lambda r: _attention_ok(r, q, k, v),
                 ["logit_soft_cap"])


def splash_short(q_len: int, kv_len: int) -> tuple[str, str]:
  import muonclip_jax as mc
  q, k, v = _qkv(q_len, kv_len)
  fa = functools.partial(mc.flash_attention, implementation="splash", interpret=True,
                         is_causal=True)
  return _expect(lambda: _sown(fa, q, k, v), lambda r: _attention_ok(r, q, k, v, True),
                 ["key", str(kv_len)])


def auto_on_tpu(kv_len: int) -> tuple[str, str]:
  """``implementation="auto"`` as on a TPU (the backend query patched), kernels interpreted."""
  import muonclip_jax as mc
  q, k, v = _qkv(kv_len, kv_len)
  fa = functools.partial(mc.flash_attention, implementation="auto", interpret=True,
                         is_causal=True)
  real = jax.default_backend
  jax.default_backend = lambda: "tpu"
  try:
    return _expect(lambda: _sown(fa, q, k, v), lambda r: _attention_ok(r, q, k, v, True),
                   ["key", str(kv_len)])
  finally:
    jax.default_backend = real


def bad_mask(kind: str) -> tuple[str, str]:
  import muonclip_jax as mc
  q, k, v = _qkv()
  fa = functools.partial(mc.flash_attention, implementation="xla")
  valid = jnp.arange(T)[None, :] < jnp.array([[T], [T // 2]])
  if kind == "[B, T]":
    return _expect(lambda: fa(q, k, v, mask=valid), None, ["mask", str((B, T))])
  if kind == "wrong batch":
    wrong = jnp.ones((B + 1, 1, 1, T), bool)
    return _expect(lambda: fa(q, k, v, mask=wrong), None, ["mask", str((B + 1, 1, 1, T))])
  # int 0/1: nonzero attends (Flax's reading); the reference is the boolean mask.
  want = _sown(functools.partial(fa, mask=valid[:, None, None, :]), q, k, v)
  as_int = functools.partial(fa, mask=valid[:, None, None, :].astype(jnp.int32))
  return _expect(lambda: _sown(as_int, q, k, v),
                 lambda r: all(np.array_equal(a, b) for a, b in zip(r, want, strict=True)),
                 ["mask", "boolean"])


def splash_rank(rank: int) -> tuple[str, str]:
  import muonclip_jax as mc
  q, k, v = _qkv(128, 128)
  if rank == 3:
    q, k, v = q[0], k[0], v[0]
  else:
    q, k, v = q[None], k[None], v[None]
  return _expect(lambda: mc.flash_attention(q, k, v, implementation="splash", interpret=True),
                 None, ["query", "rank"])


# -- the planner ----------------------------------------------------------------------


def plan_mesh_size() -> tuple[str, str]:
  import muonclip_jax as mc
  w = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  return _expect(lambda: mc.plan_muon_sharding(w, {"x": 2.7}),
                 lambda plan: plan.axis_sizes == {"x": 2.7}, ["mesh", "'x'"])


def plan_leaf(leaf: Any) -> tuple[str, str]:
  import muonclip_jax as mc
  params = {"layer": {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32), "act": leaf}}
  return _expect(lambda: mc.plan_muon_sharding(params, {"x": 2}), None, ["layer/act"])


# -- checkpoints ----------------------------------------------------------------------


def _steps(directory: Path) -> set[str]:
  return {p.name for p in directory.iterdir() if p.name.isdigit()} if directory.is_dir() \
      else set()


def _with_lost(directory: Path, before: set[str], outcome: tuple[str, str]) -> tuple[str, str]:
  gone = before - _steps(directory)
  if gone:
    return LOST, f"intact step(s) {sorted(gone)} removed; {outcome[1]}"
  return outcome


def restore_other_dtype(root: Path) -> tuple[str, str]:
  import muonclip_jax as mc
  mgr = mc.make_checkpoint_manager(root / "dtype", enable_async_checkpointing=False)
  try:
    params = {"wq": jnp.full((8, 8), 1.5, jnp.float32)}
    mc.save_checkpoint(mgr, 1, params, {"mu": jnp.zeros((8, 8))})
    before = _steps(root / "dtype")
    like = {"wq": jax.ShapeDtypeStruct((8, 8), jnp.int32)}
    outcome = _expect(
        lambda: mc.restore_checkpoint(mgr, like, {"mu": jnp.zeros((8, 8))}),
        lambda r: np.array_equal(np.asarray(r[0]["wq"]), np.asarray(params["wq"])),
        ["wq", "float32", "int32"])
    return _with_lost(root / "dtype", before, outcome)
  finally:
    mgr.close()


def save_python_int(root: Path) -> tuple[str, str]:
  import muonclip_jax as mc
  mgr = mc.make_checkpoint_manager(root / "pyint", enable_async_checkpointing=False)
  params = {"w": jnp.ones((8, 8)), "num_layers": 3}
  state = {"mu": jnp.zeros((8, 8))}

  def round_trip():
    mc.save_checkpoint(mgr, 1, params, state)
    return mc.restore_checkpoint(mgr, params, state)

  try:
    return _expect(round_trip, lambda r: r[0]["num_layers"] == 3
                   and np.array_equal(np.asarray(r[0]["w"]), np.ones((8, 8))), ["num_layers"])
  finally:
    mgr.close()


def manager_at(root: Path, kind: str) -> tuple[str, str]:
  """``make_checkpoint_manager`` at ``''``, at a file, or at ``s3://``: refused up front, or
  a save that restores."""
  import muonclip_jax as mc
  work = root / f"cwd_{kind}"
  work.mkdir()
  target = {"empty": "", "s3": "s3://bucket/run"}.get(kind)
  if kind == "file":
    (work / "a_file").write_text("not a directory")
    target = str(work / "a_file")
  names = ["directory"] + (["s3"] if kind == "s3" else [])
  old = os.getcwd()
  os.chdir(work)
  try:
    try:
      mgr = mc.make_checkpoint_manager(target, enable_async_checkpointing=False)
    except Exception as e:  # noqa: BLE001
      return _error(e, names)
    params, state = {"w": jnp.ones((4, 4))}, {"mu": jnp.zeros((4, 4))}
    try:
      mc.save_checkpoint(mgr, 1, params, state)
      restored = mc.restore_checkpoint(mgr, params, state)
    except Exception as e:  # noqa: BLE001
      left = sorted(p.name for p in work.iterdir() if p.name != "a_file")
      return UNCLEAR, (f"created, then the save failed: {type(e).__name__}: {_short(str(e))}"
                       + (f"; left in the working directory: {left}" if left else ""))
    finally:
      with contextlib.suppress(Exception):
        mgr.close()
    ok = np.array_equal(np.asarray(restored[0]["w"]), np.ones((4, 4)))
    return (RIGHT, "saved and restored") if ok else (SILENT, "restored other values")
  finally:
    os.chdir(old)


def restore_unverified_damage(root: Path) -> tuple[str, str]:
  import muonclip_jax as mc
  directory = root / "damaged"
  mgr = mc.make_checkpoint_manager(directory, enable_async_checkpointing=False)
  try:
    params = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64)}
    state = {"mu": jnp.zeros((64, 64))}
    mc.save_checkpoint(mgr, 1, params, state)
    files = sorted((p for p in (directory / "1").rglob("*") if p.is_file()),
                   key=lambda p: -p.stat().st_size)
    data = bytearray(files[0].read_bytes())
    for i in range(len(data) // 4, len(data) // 4 + 64):
      data[i] ^= 0xFF
    files[0].write_bytes(bytes(data))
    before = _steps(directory)
    outcome = _expect(lambda: mc.restore_checkpoint(mgr, params, state, verify=False),
                      lambda r: np.array_equal(np.asarray(r[0]["w"]), np.asarray(params["w"])),
                      ["1"])
    if outcome[0] == SILENT:
      doc = " ".join((mc.restore_checkpoint.__doc__ or "").split())
      if "verify=False" in doc or ("False" in doc and "skip" in doc):
        outcome = DOCUMENTED, outcome[1] + "; the docstring says what verify=False skips"
    return _with_lost(directory, before, outcome)
  finally:
    mgr.close()


# -- the command line -------------------------------------------------------------------

CLI_TINY = ["--steps", "4", "--batch", "4", "--seq-len", "16", "--d-model", "32",
            "--layers", "1", "--heads", "2", "--eval-every", "2", "--eval-batches", "1",
            "--max-bytes", "65536", "--no-progress"]


def cli(root: Path, flags: Sequence[str], names: Sequence[str]) -> tuple[str, str]:
  """``examples.lm.train`` in process: refused (exit status != 0, naming the flag) before
  training, or a run that exits 0 (silent)."""
  from examples.lm import train as train_lm
  from examples.lm import trainer as trainer_lib
  started = []
  run = trainer_lib.Trainer.run

  def spy(self, *a, **k):
    started.append(True)
    return run(self, *a, **k)

  out, err = io.StringIO(), io.StringIO()
  trainer_lib.Trainer.run = spy
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      train_lm.main(CLI_TINY + ["--out", str(root / "cli")] + list(flags))
  except SystemExit as e:
    text = err.getvalue() + out.getvalue() + (e.code if isinstance(e.code, str) else "")
    if e.code in (0, None):
      return SILENT, "exit status 0"
    lines = [x for x in text.strip().splitlines() if any(n in x for n in names)]
    outcome = CLEAR if lines and (not started or "Diverged" in text) else UNCLEAR
    where = "after training started" if started else "before training"
    return outcome, f"exit status {e.code} {where}: {_short(lines[-1] if lines else text)}"
  except Exception as e:  # noqa: BLE001
    outcome, detail = _error(e, names)
    if started:
      outcome, detail = UNCLEAR, "after training started: " + detail
    return outcome, detail
  finally:
    trainer_lib.Trainer.run = run
  report = out.getvalue().strip().splitlines()[-1:] or [""]
  return SILENT, f"exit status 0; last line: {_short(report[0])}"


# -- the table ----------------------------------------------------------------------------


def rows(root: Path) -> list[tuple[str, str, Callable[[], tuple[str, str]]]]:
  """``(call, bad input, try)`` for every input of the issue's table (14 rows)."""
  out: list[tuple[str, str, Callable[[], tuple[str, str]]]] = []
  for cap in (0.0, -1.0, math.inf, math.nan):
    out.append(("flash_attention", f"logit_soft_cap={cap}", functools.partial(soft_cap, cap)))
  for q_len, kv_len in ((64, 64), (200, 200)):
    out.append(('flash_attention(implementation="splash")', f"key length {kv_len}",
                functools.partial(splash_short, q_len, kv_len)))
    out.append(('flash_attention(implementation="auto") on TPU', f"key length {kv_len}",
                functools.partial(auto_on_tpu, kv_len)))
  for kind in ("[B, T]", "wrong batch", "int 0/1"):
    out.append(("flash_attention xla", f"mask {kind}", functools.partial(bad_mask, kind)))
  for rank in (3, 5):
    out.append(("flash_attention splash", f"rank-{rank} inputs",
                functools.partial(splash_rank, rank)))
  out.append(("plan_muon_sharding", "mesh {'x': 2.7}", plan_mesh_size))
  for leaf in (1.5, "relu"):
    out.append(("plan_muon_sharding", f"a Python {type(leaf).__name__} leaf",
                functools.partial(plan_leaf, leaf)))
  out.append(("restore_checkpoint", "float32 saved, int32 target",
              functools.partial(restore_other_dtype, root)))
  out.append(("save_checkpoint", "a Python int leaf", functools.partial(save_python_int, root)))
  for kind, text in (("empty", "''"), ("file", "a path that is a file"), ("s3", "s3://...")):
    out.append(("make_checkpoint_manager", text, functools.partial(manager_at, root, kind)))
  out.append(("restore_checkpoint(verify=False)", "a damaged step",
              functools.partial(restore_unverified_damage, root)))
  for flags, names in ((["--lr", "nan"], ["--lr"]), (["--lr", "1e30"], ["--lr"]),
                       (["--seq-len", "0"], ["--seq-len"]),
                       (["--ckpt-every", "0", "--ckpt-dir", str(root / "cli_ck")],
                        ["--ckpt-every"])):
    label = " ".join(flags[:2]) + (" (trains to a NaN loss)" if flags[1] == "1e30" else "")
    out.append(("CLI", label, functools.partial(cli, root, flags, names)))
  return out


def run(only: Sequence[str] = ()) -> list[Result]:
  """Tries every input (those whose call or input contains one of ``only``, if given)."""
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for call, bad, fn in rows(Path(tmp)):
      if only and not any(s in call or s in bad for s in only):
        continue
      try:
        outcome, detail = fn()
      except Exception as e:  # noqa: BLE001 - a crash of this script on one row
        tb = traceback.format_exception_only(type(e), e)[-1]
        outcome, detail = NOT_RUN, f"this script failed: {_short(tb)}"
      results.append(Result(call, bad, outcome, detail))
  return results


def totals(results: Sequence[Result]) -> str:
  """``tried N, clear error N, right answer N, silent N, lost N`` (+ other classes seen)."""
  count = lambda o: sum(r.outcome == o for r in results)
  tried = sum(r.outcome != NOT_RUN for r in results)
  line = (f"tried {tried}, clear error {count(CLEAR)}, right answer {count(RIGHT)}, "
          f"silent {count(SILENT)}, lost {count(LOST)}")
  for extra in (DOCUMENTED, UNCLEAR, NOT_RUN):
    if count(extra):
      line += f", {extra} {count(extra)}"
  return line


def markdown(results: Sequence[Result]) -> str:
  from benchmarks._common import machine, table
  body = table(["call", "bad input", "outcome", "what happened"],
               [(f"`{r.call}`", r.bad_input, f"**{r.outcome}**", r.detail) for r in results])
  return (f"Every input of issue 15's section 4 table, tried by `python -m "
          f"benchmarks.bad_inputs` on {machine()}. A clear error names the argument, "
          f"parameter path or flag; a right answer matches an independent reference.\n\n"
          f"{body}\n\n{totals(results)}\n")


def main(argv: Sequence[str] | None = None) -> list[Result]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--no-write", action="store_true", help="leave RESULTS.md alone")
  p.add_argument("--only", nargs="+", default=(),
                 help="only the inputs whose call or input contains one of these")
  args = p.parse_args(argv)
  results = run(args.only)
  text = markdown(results)
  print(text)
  if not args.no_write and not args.only:
    from benchmarks._common import write_section
    write_section("bad_inputs", text)
  return results


if __name__ == "__main__":
  main()
