"""Smoke run of benchmarks/checkpointing.py (tiny tree, one round, 1 and 2 processes).

No timing is asserted, and RESULTS.md is left alone. The benchmark itself fails when a
restore differs from the saved arrays, so a report here means every restore was exact.
"""

import math

from benchmarks import checkpointing


def test_checkpointing_benchmark_quick():
  reports = checkpointing.main(["--quick"])
  assert set(reports) == {1, 2}
  for processes, r in reports.items():
    assert r["processes"] == processes and r["devices"] == 8
    assert r["restored_equal"] is True
    assert r["checkpoint_bytes"] > 0 and r["checkpoint_files"] > 0
    assert all(math.isfinite(v) for v in r["medians"].values()), r["medians"]
    figures = [r["step_ratio"]]
    for key in ("step_plain_s", "step_during_save_s", "save_blocks_s", "save_s", "verify_s",
                "restore_s"):
      figures += r[key]
    assert all(math.isfinite(x) and x > 0 for x in figures), r
    assert all(x >= 0 for x in r["save_tail_s"]), r
