"""Preemption: the whole 2-process example SIGKILLed 5 times, resumed each time, ends bitwise equal.

benchmarks/preemption.py does the work (it also records the figures in
benchmarks/RESULTS.md, on 2 processes x 4 host devices): an uninterrupted run
of ``examples/lm/train.py``, then the same command SIGKILLed at random
moments (one of them while Orbax writes a step) and restarted with
``--resume``. Seven launches in all; to fit the CI budget each process here
drives one host device (mesh 2x1, the data axis across the processes), which
halves a launch's start-up (gloo connects fewer ranks, 2 cores run fewer
device threads) and keeps every cross-process path: per-process batch rows,
cross-process all-reduce and all-to-alls, checkpoints written by both and
committed by one. JAX's persistent compilation cache spares the restarts
their compilation.
"""

from __future__ import annotations

from benchmarks import preemption


def test_killed_five_times_the_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
  job = preemption.Job(processes=2, devices_per_process=1, mesh=(2, 1))
  report, same_state, same_losses, _ = preemption.study(tmp_path, kills=5, steps=12, seed=0,
                                                        job=job)
  assert len(report.kills) == 5 and report.survived == 5, report
  assert any(k.mid_save for k in report.kills), report  # at least one kill mid-save
  for k in report.kills:  # never resumes past the last step logged before the kill
    assert k.resumed_from is not None and k.resumed_from <= k.step, k
  assert same_state  # parameters and the whole optimizer state, bit for bit
  assert same_losses  # and every logged training loss
  assert report.leftovers == []  # temporary directories of killed saves were cleaned up
