"""Helpers shared by the test files (import-safe: no jax set-up at import time).

* :mod:`support.arrays`: random arrays and masks;
* :mod:`support.checkpoint_setup`: the sharded parameters and optimizer state
  the checkpoint tests and their worker processes save and restore.

``tests/`` is on ``sys.path`` (pytest's rootdir-relative import, and the
worker scripts run from it), so test files import ``support.<module>``.
"""
