"""Examples to copy: one-device loops (``train_nnx``, ``train_linen``), the pod trainer ``lm``.

Run them from a checkout with the package installed (``pip install -e ".[examples]"``),
from the repository root: ``python -m examples.train_nnx``, ``python -m examples.lm.train``.
"""
