"""Helpers shared by the test files (import-safe: no jax set-up at import time).

* :mod:`support.arrays`: random arrays and masks;
* :mod:`support.checkpoint_setup`: the sharded parameters and optimizer state
  the checkpoint tests and their worker processes save and restore;
* :mod:`support.distributed`: ``run_distributed``, a real multi-process
  ``jax.distributed`` job on this machine, supervised by ``examples/launch.py``;
  :mod:`support.distributed_worker` is the script each of its processes runs, and
  :mod:`support.workers_basic`, :mod:`support.workers_training` and
  :mod:`support.workers_gcs` hold the functions those processes call;
* :mod:`support.gcs_emulator`: the local GCS emulator (fixture ``gcs``), and
  :mod:`support.gcs_save_child`, the process killed mid-save on ``gs://``.

``tests/`` is on ``sys.path`` (pytest's rootdir-relative import, and the
worker scripts run from it), so test files import ``support.<module>``.
"""
