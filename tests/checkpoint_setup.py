"""Old import path of :mod:`support.checkpoint_setup`, kept for the worker scripts.

``tests/mp_workers.py`` and ``tests/mp_workers_gcs.py`` import
``checkpoint_setup`` by this name; they belong to another branch in flight.
Once they import ``support.checkpoint_setup``, delete this file.
"""

from support.checkpoint_setup import MAX_LOGITS, SHAPES, abstract, make_params, setup

__all__ = ["MAX_LOGITS", "SHAPES", "abstract", "make_params", "setup"]
