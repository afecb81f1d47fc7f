"""A byte-level language model trained with MuonClip, from one device to a pod slice.

Run it with ``python -m examples.lm.train --help`` from the repository root. The
names below are the pieces that the single-device example, the notebooks'
readers and the studies in ``benchmarks/`` reuse; ``train`` and ``config`` (the
command line) are not imported here, so that ``python -m examples.lm.train``
runs its module once.
"""

from .input_pipeline import STDLIB_FILES, ByteData, default_corpus, load_text
from .metrics import plot_run, save_metrics, smooth
from .model import (
    Attention,
    Block,
    ModelConfig,
    Transformer,
    apply_model,
    count_params,
    head_max_logits,
    init_model,
    loss_fn,
    rope,
)
from .optim import (
    OPTIMIZERS,
    OptimConfig,
    clip_telemetry,
    lr_schedule,
    make_optimizer,
    qk_clip_report,
)
from .sharding import (
    constrain_to_mesh,
    local_rows,
    make_mesh,
    param_spec,
    place,
    shard_params,
)
from .trainer import Checkpointer, Compiled, RunConfig, Trainer

__all__ = [
    "OPTIMIZERS",
    "STDLIB_FILES",
    "Attention",
    "Block",
    "ByteData",
    "Checkpointer",
    "Compiled",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "Trainer",
    "Transformer",
    "apply_model",
    "clip_telemetry",
    "constrain_to_mesh",
    "count_params",
    "default_corpus",
    "head_max_logits",
    "init_model",
    "load_text",
    "local_rows",
    "loss_fn",
    "lr_schedule",
    "make_mesh",
    "make_optimizer",
    "param_spec",
    "place",
    "plot_run",
    "qk_clip_report",
    "rope",
    "save_metrics",
    "shard_params",
    "smooth",
]
