"""The experiment harness: a small byte-level language model and its training loop.

Shared by ``examples/lm/train.py``, the notebooks, the studies in
``benchmarks/`` and the tests, so none of them copies model or training code.

* Data: :func:`default_corpus` gathers text from a fixed list of files of the
  Python standard library on this machine (no download); :class:`ByteData`
  splits any bytes into train/validation and samples windows deterministically
  from ``(seed, step)``, so a resumed run sees the same batches.
* Model: :class:`Transformer`, Flax NNX, pre-norm, RoPE, optional GQA
  (``num_kv_heads``), GELU MLP, untied LM head. Attention is hand-written: the
  projections are ``nnx.LinearGeneral`` modules named ``query``/``key``/
  ``value``/``out`` (the layout of Flax's own attention), and the logits go
  through :func:`muonclip_jax.dot_product_attention` with ``module=self``,
  which sows the per-head max logit ``max_logits`` where QK-Clip finds the
  query and key kernels next to it. Module names route the embedding
  (``embed``), the LM head (``lm_head``) and the norms (``*norm*``) to AdamW
  under :func:`muonclip_jax.default_param_labels`.
* Training: :func:`make_optimizer` builds ``adamw``, ``muon`` or ``muonclip``;
  :class:`Trainer` holds parameters as a plain dict, jits one train step
  (fixed shapes, compiled once) and records metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sysconfig
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import muonclip_jax

OPTIMIZERS = ("muonclip", "muon", "adamw")

# Files of the standard library that make up the default corpus, in order.
# Missing ones (they differ between Python versions) are skipped.
STDLIB_FILES = (
    "textwrap.py", "functools.py", "heapq.py", "bisect.py", "random.py",
    "statistics.py", "fractions.py", "string.py", "dataclasses.py", "enum.py",
    "collections/__init__.py", "json/__init__.py", "json/decoder.py",
    "json/encoder.py", "contextlib.py", "abc.py", "copy.py", "pprint.py",
    "calendar.py", "csv.py", "argparse.py", "difflib.py", "shutil.py",
    "tempfile.py", "pathlib.py", "inspect.py", "typing.py", "doctest.py",
    "unittest/case.py", "logging/__init__.py", "threading.py", "zipfile.py",
    "subprocess.py", "tarfile.py", "_pydecimal.py",
)


# --------------------------------------------------------------------------
# Data.


def default_corpus(max_bytes: int = 1 << 20) -> bytes:
  """Text of a fixed list of standard-library files, concatenated, at most ``max_bytes``.

  The files come from ``sysconfig.get_paths()['stdlib']`` in the order of
  :data:`STDLIB_FILES`; each is preceded by a ``# file: NAME`` line. The result
  is the same on every run on one machine (it depends on the Python version).

  Raises:
    FileNotFoundError: none of the files exists (an unusual Python install;
      pass ``--text PATH`` instead).
  """
  root = Path(sysconfig.get_paths()["stdlib"])
  parts: list[bytes] = []
  total = 0
  for name in STDLIB_FILES:
    path = root / name
    if not path.is_file():
      continue
    chunk = f"# file: {name}\n".encode() + path.read_bytes() + b"\n"
    parts.append(chunk)
    total += len(chunk)
    if total >= max_bytes:
      break
  if not parts:
    raise FileNotFoundError(f"no standard-library source found under {root}; use --text PATH")
  return b"".join(parts)[:max_bytes]


def load_text(path: str | os.PathLike[str] | None = None, max_bytes: int = 1 << 20) -> bytes:
  """The bytes of ``path``, or :func:`default_corpus` when ``path`` is ``None``."""
  if path is None:
    return default_corpus(max_bytes)
  data = Path(path).read_bytes()
  return data[:max_bytes] if max_bytes else data


class ByteData:
  """Bytes split into a training head and a validation tail, sampled in windows.

  Args:
    data: the corpus.
    seq_len: tokens per example; windows have ``seq_len + 1`` bytes (inputs
      and shifted targets).
    val_fraction: share of the corpus (at its end) held out for validation.
  """

  def __init__(self, data: bytes, seq_len: int, val_fraction: float = 0.1) -> None:
    if not 0.0 < val_fraction < 1.0:
      raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    arr = np.frombuffer(data, dtype=np.uint8)
    n_val = int(len(arr) * val_fraction)
    self.seq_len = seq_len
    self.train = arr[: len(arr) - n_val]
    self.val = arr[len(arr) - n_val:]
    for name, part in (("training", self.train), ("validation", self.val)):
      if len(part) < seq_len + 2:
        raise ValueError(f"the {name} split has {len(part)} bytes, fewer than seq_len + 2 = "
                         f"{seq_len + 2}; use a longer text or a shorter --seq-len")

  def _windows(self, part: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-byte targets of the windows starting at ``starts``."""
    idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
    w = part[idx].astype(np.int32)
    return w[:, :-1], w[:, 1:]

  def train_batch(self, seed: int, step: int, batch: int, rows: slice = slice(None)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets ``(batch, seq_len)`` for training step ``step``.

    A pure function of ``(seed, step)``: resuming at ``step`` replays the batches.
    ``rows`` selects rows of that global batch (a process's share of it): only
    their windows are read.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(self.train) - self.seq_len - 1, size=batch)
    return self._windows(self.train, starts[rows])

  def val_batches(self, batch: int, num_batches: int, rows: slice = slice(None)
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``num_batches`` fixed validation batches of evenly spaced windows.

    ``rows`` selects rows of each batch, as in :meth:`train_batch`.
    """
    n_windows = (len(self.val) - 1) // self.seq_len
    n = max(1, min(num_batches, n_windows // batch))
    count = min(n * batch, n_windows)
    starts = np.linspace(0, len(self.val) - self.seq_len - 1, count).astype(np.int64)
    starts = np.resize(starts, n * batch)
    return [self._windows(self.val, starts[i * batch:(i + 1) * batch][rows]) for i in range(n)]


# --------------------------------------------------------------------------
# Model.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Size of :class:`Transformer`.

  Attributes:
    vocab_size: 256 for bytes.
    d_model: residual width.
    num_layers: transformer blocks.
    num_heads: query heads; ``d_model`` must be a multiple.
    num_kv_heads: key/value heads (GQA/MQA); ``None`` means ``num_heads``.
    mlp_ratio: MLP hidden width over ``d_model``.
    rope_base: RoPE frequency base.
  """

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int | None = None
  mlp_ratio: int = 4
  rope_base: float = 10_000.0

  @property
  def kv_heads(self) -> int:
    """Key/value heads (``num_heads`` unless GQA/MQA)."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def head_dim(self) -> int:
    """Width of one head."""
    return self.d_model // self.num_heads

  def validate(self) -> ModelConfig:
    """Returns ``self``; raises ``ValueError`` on inconsistent sizes."""
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads "
                       f"({self.num_heads})")
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
    return self


def rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding of ``x`` ``[batch, seq, heads, head_dim]`` (half split)."""
  seq, dim = x.shape[-3], x.shape[-1]
  half = dim // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles)[:, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, None, :].astype(x.dtype)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class Attention(nnx.Module):
  """Causal self-attention with RoPE and GQA that sows per-head max logits.

  Parameters ``query`` ``(d, H, hd)``, ``key``/``value`` ``(d, H_kv, hd)``,
  ``out`` ``(H, hd, d)``: Flax's attention layout, which QK-Clip detects next
  to the sown ``max_logits`` without configuration.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
    d, h, kv, hd = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    self.rope_base = cfg.rope_base
    self.query = nnx.LinearGeneral(d, (h, hd), use_bias=False, rngs=rngs)
    self.key = nnx.LinearGeneral(d, (kv, hd), use_bias=False, rngs=rngs)
    self.value = nnx.LinearGeneral(d, (kv, hd), use_bias=False, rngs=rngs)
    self.out = nnx.LinearGeneral((h, hd), d, axis=(-2, -1), use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    q = rope(self.query(x), self.rope_base)
    k = rope(self.key(x), self.rope_base)
    v = self.value(x)
    y = muonclip_jax.dot_product_attention(q, k, v, is_causal=True, module=self)
    return self.out(y)


class Block(nnx.Module):
  """Pre-norm transformer block: RMSNorm, attention, RMSNorm, GELU MLP."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
    d = cfg.d_model
    self.attn_norm = nnx.RMSNorm(d, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(d, rngs=rngs)
    self.fc_in = nnx.Linear(d, cfg.mlp_ratio * d, use_bias=False, rngs=rngs)
    self.fc_out = nnx.Linear(cfg.mlp_ratio * d, d, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.fc_out(jax.nn.gelu(self.fc_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
  """Byte-level decoder-only transformer: ``embed``, ``blocks``, ``final_norm``, ``lm_head``."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
    cfg.validate()
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
    self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self.lm_head(self.final_norm(x))


def init_model(cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """The model's graph definition and its parameters as a plain nested dict."""
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def apply_model(graphdef: nnx.GraphDef, params: dict[str, Any], tokens: jax.Array
                ) -> tuple[jax.Array, dict[str, Any]]:
  """Logits ``[batch, seq, vocab]`` and the sown statistics (a plain dict)."""
  model = nnx.merge(graphdef, params)
  logits, stats = nnx.capture(model, nnx.Intermediate)(tokens)
  return logits, nnx.to_pure_dict(stats)


def head_max_logits(stats: dict[str, Any], num_layers: int) -> jax.Array:
  """Per-layer, per-head max logits ``[layers, heads]`` from :func:`apply_model`'s stats."""
  return jnp.stack([stats["blocks"][i]["attn"]["max_logits"] for i in range(num_layers)])


def count_params(params: Any) -> int:
  """Number of scalars in ``params``."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------
# Optimisers.


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimiser settings.

  Attributes:
    name: ``"muonclip"``, ``"muon"`` or ``"adamw"``.
    lr: peak learning rate (Muon branch; the AdamW optimiser for ``adamw``).
    adam_lr: peak learning rate of the AdamW branch of Muon/MuonClip
      (``None``: ``lr``, as in Moonlight, thanks to the 0.2 RMS match).
    tau: QK-Clip threshold (``muonclip`` only).
    weight_decay: decoupled weight decay for every parameter.
    warmup: linear warm-up steps.
    schedule: ``"cosine"`` (decay to ``final_lr_frac`` of the peak at
      ``total_steps``) or ``"constant"`` after warm-up.
    total_steps: steps of the run (cosine horizon).
    final_lr_frac: end of the cosine schedule, as a fraction of the peak.
  """

  name: str = "muonclip"
  lr: float = 0.01
  adam_lr: float | None = None
  tau: float = 100.0
  weight_decay: float = 0.1
  warmup: int = 20
  schedule: str = "cosine"
  total_steps: int = 300
  final_lr_frac: float = 0.1


def lr_schedule(peak: float, cfg: OptimConfig) -> optax.Schedule:
  """Linear warm-up to ``peak``, then cosine decay or constant (see :class:`OptimConfig`)."""
  warmup = max(1, min(cfg.warmup, cfg.total_steps))
  if cfg.schedule == "constant":
    return optax.linear_schedule(0.0, peak, warmup)
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(cfg.total_steps, warmup + 1), peak * cfg.final_lr_frac)
  raise ValueError(f"schedule: expected 'cosine' or 'constant', got {cfg.schedule!r}")


def make_optimizer(cfg: OptimConfig, mesh: Mesh | None = None) -> optax.GradientTransformation:
  """The optimiser named by ``cfg.name``.

  * ``adamw``: ``optax.adamw`` (b1 0.9, b2 0.95), the same AdamW that Muon uses
    for its non-matrix parameters.
  * ``muon``: :func:`muonclip_jax.muon` (Muon on hidden matrices, AdamW on the
    embedding, LM head and norms).
  * ``muonclip``: :func:`muonclip_jax.muonclip`.

  All three take ``update(..., max_logits=stats)`` (Muon and AdamW ignore it),
  so one train step serves them all.

  ``mesh`` makes Muon's Newton–Schulz device-local (``muon(..., mesh=mesh)``).
  """
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {cfg.name!r}")
  lr = lr_schedule(cfg.lr, cfg)
  adam_lr = lr if cfg.adam_lr is None else lr_schedule(cfg.adam_lr, cfg)
  if cfg.name == "adamw":
    return optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=cfg.weight_decay)
  kwargs: dict[str, Any] = dict(weight_decay=cfg.weight_decay, adam_learning_rate=adam_lr)
  if mesh is not None:
    kwargs["mesh"] = mesh
  if cfg.name == "muon":
    return muonclip_jax.muon(lr, **kwargs)
  return muonclip_jax.muonclip(lr, tau=cfg.tau, **kwargs)


# --------------------------------------------------------------------------
# Sharding.


def make_mesh(shape: tuple[int, int]) -> Mesh:
  """A ``('data', 'model')`` mesh of the first ``data * model`` devices.

  With several processes (``jax.distributed``) the mesh must span all devices
  of all processes; ``jax.make_mesh`` orders them so that each process owns a
  contiguous block of the ``data`` axis (its rows of the batch).
  """
  data, model = shape
  n = data * model
  devices = jax.devices()
  if len(devices) < n:
    raise ValueError(f"mesh {data}x{model} needs {n} devices, found {len(devices)}; on CPU "
                     "set XLA_FLAGS=--xla_force_host_platform_device_count before jax starts")
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(f"mesh {data}x{model} must use all {len(devices)} devices of the "
                     f"{jax.process_count()} processes")
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:n])


def param_spec(shape: Sequence[int], mesh: Mesh) -> P:
  """FSDP-style spec: a matrix's first axis over ``data``, its last over ``model``.

  An axis is sharded only when the mesh axis divides it; vectors are replicated.
  """
  if len(shape) < 2:
    return P()
  spec: list[str | None] = [None] * len(shape)
  if shape[0] % mesh.shape["data"] == 0 and mesh.shape["data"] > 1:
    spec[0] = "data"
  if shape[-1] % mesh.shape["model"] == 0 and mesh.shape["model"] > 1:
    spec[-1] = "model"
  while spec and spec[-1] is None:  # P('data') as XLA writes it, not P('data', None):
    spec.pop()                      # the same layout, but another jit cache key
  return P(*spec)


def place(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from a host value that every process holds in full.

  Each process copies only the shards of its own devices
  (``jax.make_array_from_callback``), so this works across processes.
  """
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: Any, mesh: Mesh) -> Any:
  """``params`` (or the optimiser state) placed on ``mesh`` with :func:`param_spec`.

  Host values and single-device arrays must be the same on every process;
  arrays already on the mesh are resharded.
  """
  def put(x: Any) -> jax.Array:
    want = NamedSharding(mesh, param_spec(x.shape, mesh))
    if isinstance(getattr(x, "sharding", None), NamedSharding):
      return x if x.sharding == want else jax.device_put(x, want)
    return place(x, want)
  return jax.tree.map(put, params)


def constrain_to_mesh(tree: Any, mesh: Mesh) -> Any:
  """Inside ``jax.jit``: every leaf of ``tree`` laid out as :func:`shard_params` lays it out.

  The train step's outputs then have its inputs' shardings, so the next call
  runs the same compiled program (XLA would otherwise pick, for instance,
  ``P('model')`` for a replicated norm scale, and the second step recompiles).
  """
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, param_spec(x.shape, mesh))), tree)


def local_rows(sharding: NamedSharding, batch: int) -> slice:
  """The rows of a ``(batch, ...)`` array sharded as ``sharding`` that this process holds.

  Raises:
    ValueError: they are not one contiguous block (a mesh whose ``data`` axis
      interleaves processes), which per-process input does not support.
  """
  indices = sharding.addressable_devices_indices_map((batch, 1)).values()
  rows = sorted({r for idx in indices for r in range(*idx[0].indices(batch))})
  if rows != list(range(rows[0], rows[-1] + 1)):
    raise ValueError(f"this process holds rows {rows} of the batch, not a contiguous block")
  return slice(rows[0], rows[-1] + 1)


# --------------------------------------------------------------------------
# Training.


def loss_fn(graphdef: nnx.GraphDef, params: dict[str, Any], x: jax.Array, y: jax.Array
            ) -> tuple[jax.Array, dict[str, Any]]:
  """Mean next-byte cross-entropy (nats) and the sown statistics."""
  logits, stats = apply_model(graphdef, params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
  return loss.mean(), stats


@dataclasses.dataclass
class RunConfig:
  """Everything that defines a training run.

  Attributes:
    model: model size.
    optim: optimiser.
    steps: training steps.
    batch: sequences per step.
    seq_len: bytes per sequence.
    seed: initialisation and data seed.
    eval_every: steps between validation evaluations (and the last step).
    eval_batches: validation batches per evaluation.
    mesh: ``(data, model)`` mesh shape, or ``None`` for one device.
  """

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  steps: int = 300
  batch: int = 16
  seq_len: int = 128
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  mesh: tuple[int, int] | None = None

  def to_dict(self) -> dict[str, Any]:
    """The configuration as plain JSON-serialisable values."""
    return dataclasses.asdict(self)


class Compiled(NamedTuple):
  """What every run of one (model, optimiser, mesh) shares: compiled steps included."""

  mesh: Mesh | None
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]


_COMPILED: dict[tuple[Any, ...], Compiled] = {}


def _compiled(model: ModelConfig, optim: OptimConfig, mesh_shape: tuple[int, int] | None
              ) -> Compiled:
  """The jitted train and eval steps for a configuration, built once per process.

  Runs that differ only in seed, data or step count (sweeps, resumes, tests)
  reuse one compilation. The train step donates parameters and optimiser state.
  """
  key = (model, optim, mesh_shape)
  if key in _COMPILED:
    return _COMPILED[key]
  mesh = make_mesh(mesh_shape) if mesh_shape else None
  graphdef, _ = init_model(model, 0)
  tx = make_optimizer(optim, mesh)
  num_layers = model.num_layers

  def train_step(params: dict[str, Any], opt_state: optax.OptState, x: jax.Array,
                 y: jax.Array) -> tuple[dict[str, Any], optax.OptState, jax.Array, jax.Array]:
    (loss, stats), grads = jax.value_and_grad(
        lambda p: loss_fn(graphdef, p, x, y), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=stats)
    params = optax.apply_updates(params, updates)
    heads = head_max_logits(stats, num_layers)
    if mesh is not None:  # the inputs' layout; metrics replicated, for every process to read
      params, opt_state = constrain_to_mesh((params, opt_state), mesh)
      heads = jax.lax.with_sharding_constraint(heads, NamedSharding(mesh, P()))
    return params, opt_state, loss, heads

  out = Compiled(mesh, graphdef, tx, jax.jit(train_step, donate_argnums=(0, 1)),
                 jax.jit(lambda p, x, y: loss_fn(graphdef, p, x, y)[0]))
  _COMPILED[key] = out
  return out


class Trainer:
  """Holds the parameters and optimiser state of one run; steps and evaluates.

  The train step is ``jax.jit``-compiled once per configuration and process
  (fixed shapes, parameters and state donated; see :func:`_compiled`); the step
  counter that the data sampler uses lives on the host.

  Args:
    cfg: the run.
    data: the corpus, split (its ``seq_len`` must equal ``cfg.seq_len``).
  """

  def __init__(self, cfg: RunConfig, data: ByteData) -> None:
    if data.seq_len != cfg.seq_len:
      raise ValueError(f"data.seq_len ({data.seq_len}) != cfg.seq_len ({cfg.seq_len})")
    if cfg.batch < 1 or cfg.steps < 0:
      raise ValueError("batch must be positive and steps non-negative")
    self.cfg = cfg
    self.data = data
    if cfg.mesh is not None and cfg.batch % cfg.mesh[0]:
      raise ValueError(f"batch ({cfg.batch}) must be a multiple of the mesh's data axis "
                       f"({cfg.mesh[0]})")
    compiled = _compiled(cfg.model, cfg.optim, cfg.mesh)
    self.mesh, self.graphdef, self.tx = compiled.mesh, compiled.graphdef, compiled.tx
    self._train_step, self._eval_step = compiled.train_step, compiled.eval_step
    _, params = init_model(cfg.model, cfg.seed)
    if self.mesh is not None:
      params = shard_params(params, self.mesh)
    self.params = params
    # Copies: optax may share one buffer between state leaves, which donation rejects.
    opt_state = jax.tree.map(jnp.copy, self.tx.init(params))
    if self.mesh is not None:  # the train step's layout (counters replicated)
      opt_state = shard_params(opt_state, self.mesh)
    self.opt_state = opt_state
    self.step = 0
    self.metrics: dict[str, list[Any]] = {
        "step": [], "loss": [], "max_logit": [], "head_max_logit": [], "lr": [],
        "val_step": [], "val_loss": [], "time": []}
    self._batch_sharding = (None if self.mesh is None
                            else NamedSharding(self.mesh, P("data", None)))
    self._rows = (slice(None) if self.mesh is None
                  else local_rows(self._batch_sharding, cfg.batch))
    self._val = [tuple(self._put(a) for a in b)
                 for b in data.val_batches(cfg.batch, cfg.eval_batches, self._rows)]
    self._lr = lr_schedule(cfg.optim.lr, cfg.optim)

  def _put(self, rows: np.ndarray) -> jax.Array:
    """This process's rows of a batch: on the device, or the global batch sharded over ``data``."""
    if self.mesh is None:
      return jnp.asarray(rows)
    return jax.make_array_from_process_local_data(self._batch_sharding, rows,
                                                  (self.cfg.batch,) + rows.shape[1:])

  def batch(self, step: int) -> tuple[jax.Array, jax.Array]:
    """The training batch of ``step`` (deterministic in the seed and the step).

    Each process reads only its own rows of it (:func:`local_rows`).
    """
    x, y = self.data.train_batch(self.cfg.seed, step, self.cfg.batch, self._rows)
    return self._put(x), self._put(y)

  def train_step(self) -> tuple[float, np.ndarray]:
    """One optimiser step; returns the loss and the ``[layers, heads]`` max logits."""
    x, y = self.batch(self.step)
    self.params, self.opt_state, loss, heads = self._train_step(
        self.params, self.opt_state, x, y)
    loss_f, heads_np = float(loss), np.asarray(heads)
    m = self.metrics
    m["step"].append(self.step)
    m["loss"].append(loss_f)
    m["head_max_logit"].append(heads_np.tolist())
    m["max_logit"].append(heads_np.max(axis=1).tolist())
    m["lr"].append(float(self._lr(self.step)))
    m["time"].append(time.time())
    self.step += 1
    return loss_f, heads_np

  def evaluate(self) -> float:
    """Mean validation loss (nats per byte) over the fixed validation batches."""
    losses = [float(self._eval_step(self.params, x, y)) for x, y in self._val]
    val = float(np.mean(losses))
    self.metrics["val_step"].append(self.step)
    self.metrics["val_loss"].append(val)
    return val

  def run(self, steps: int | None = None, progress: Any = None,
          on_step: Callable[[Trainer], None] | None = None) -> dict[str, list[Any]]:
    """Trains until step ``steps`` (default ``cfg.steps``), evaluating every ``eval_every``.

    Args:
      steps: the step to stop at (absolute, so a resumed run continues).
      progress: optional tqdm-like bar (``update``, ``set_postfix``).
      on_step: called after each step (checkpointing, ...).

    Returns:
      The metrics dict (also ``self.metrics``).
    """
    end = self.cfg.steps if steps is None else steps
    every = max(1, self.cfg.eval_every)
    if self.step == 0 and not self.metrics["val_step"]:
      self.evaluate()
    while self.step < end:
      loss, heads = self.train_step()
      if self.step % every == 0 or self.step == end:
        self.evaluate()
      if progress is not None:
        progress.update(1)
        post = {"loss": f"{loss:.3f}", "max_logit": f"{heads.max():.1f}"}
        if self.metrics["val_loss"]:
          post["val"] = f"{self.metrics['val_loss'][-1]:.3f}"
        progress.set_postfix(post)
      if on_step is not None:
        on_step(self)
    return self.metrics

  # Checkpointing: the state is a plain pytree, saved with the package's orbax helpers.

  def state(self) -> dict[str, Any]:
    """The checkpointed state: parameters, optimiser state and step."""
    return {"params": self.params, "opt_state": self.opt_state,
            "step": jnp.asarray(self.step, jnp.int32)}

  def load_state(self, state: dict[str, Any], metrics: dict[str, list[Any]] | None = None
                 ) -> None:
    """Restores :meth:`state` (and, optionally, the metrics recorded so far)."""
    self.params = state["params"]
    self.opt_state = state["opt_state"]
    self.step = int(state["step"])
    if metrics is not None:
      self.metrics = {k: list(v) for k, v in metrics.items()}


def clip_telemetry(opt_state: Any) -> dict[str, int]:
  """QK-Clip's counters from a MuonClip optimiser state (``{}`` for other optimisers).

  ``num_clipped``: heads clipped at the last step; ``clipped_total``: summed
  over all steps (from :func:`muonclip_jax.qk_clip_metrics`).
  """
  try:
    m = muonclip_jax.qk_clip_metrics(opt_state)
  except ValueError:  # no QK-Clip in this optimiser
    return {}
  return {"num_clipped": int(m["qk_clip/heads_clipped"]),
          "clipped_total": int(m["qk_clip/heads_clipped_total"])}


class Checkpointer:
  """Saves and restores a :class:`Trainer` with the package's orbax helpers.

  Parameters and the whole optimiser state go through
  :func:`muonclip_jax.save_checkpoint`: sharded, asynchronous (training goes
  on while Orbax writes), committed together with a manifest.
  :meth:`restore_latest` uses :func:`muonclip_jax.restore_latest_valid`, which
  restores onto the trainer's current shardings (any mesh or process count)
  and skips damaged steps, on every process alike. Process 0 keeps the
  metrics recorded so far beside each step as ``metrics_<step>.json``. The
  data sampler is a function of ``(seed, step)``, so a resumed run sees
  exactly the batches an uninterrupted one would.

  Every process of a multi-process run builds one, with the same directory,
  on storage they all reach (a shared file system or a ``gs://`` bucket).

  Args:
    directory: checkpoint directory (created): a local path or ``gs://...``.
    max_to_keep: checkpoints kept (at least 2, so a damaged one has a fallback).
    async_save: return from :meth:`save` while Orbax writes.
  """

  def __init__(self, directory: str | os.PathLike[str], max_to_keep: int = 2,
               async_save: bool = True) -> None:
    path = epath.Path(directory)
    self.directory = path if "://" in str(directory) else epath.Path(path.resolve())
    self.manager = muonclip_jax.make_checkpoint_manager(
        self.directory, max_to_keep=max_to_keep, enable_async_checkpointing=async_save)

  def _metrics_path(self, step: int) -> epath.Path:
    """Where the metrics of ``step`` are kept."""
    return self.directory / f"metrics_{step}.json"

  def save(self, trainer: Trainer) -> None:
    """Starts saving the trainer's state at its current step (every process calls it)."""
    muonclip_jax.save_checkpoint(self.manager, trainer.step, trainer.params,
                                 trainer.opt_state, force=True)
    if jax.process_index() != 0:
      return
    path = self._metrics_path(trainer.step)  # written whole or not at all (preemption)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(trainer.metrics))
    tmp.replace(path)
    # Committed steps still kept, and the one being written.
    kept = {int(s) for s in self.manager.all_steps()} | {trainer.step}
    for old in self.directory.glob("metrics_*.json"):
      if int(old.stem.split("_")[1]) not in kept:
        old.unlink(missing_ok=True)

  def latest_step(self) -> int | None:
    """The latest committed step, or ``None``."""
    return self.manager.latest_step()

  def restore_latest(self, trainer: Trainer) -> int | None:
    """Loads the newest valid checkpoint into ``trainer``; returns its step (``None``: none)."""
    if not self.manager.all_steps():
      return None
    step, params, opt_state = muonclip_jax.restore_latest_valid(
        self.manager, trainer.params, trainer.opt_state)
    path = self._metrics_path(step)
    metrics = json.loads(path.read_text()) if path.exists() else None
    trainer.load_state({"params": params, "opt_state": opt_state, "step": step}, metrics)
    return step

  def close(self) -> None:
    """Waits for a save in flight to be committed and releases the manager."""
    self.manager.close()


def train(cfg: RunConfig, data: ByteData, progress: Any = None) -> Trainer:
  """Builds a :class:`Trainer` and runs it to ``cfg.steps``."""
  trainer = Trainer(cfg, data)
  trainer.run(progress=progress)
  return trainer


# --------------------------------------------------------------------------
# Metrics and plots.


def save_metrics(metrics: dict[str, list[Any]], cfg: RunConfig, out_dir: str | os.PathLike[str],
                 extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
  """Writes ``metrics.json`` (config, per-step and validation series) and ``metrics.csv``."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  doc = {"config": cfg.to_dict(), **(extra or {}), "metrics": metrics}
  json_path = out / "metrics.json"
  json_path.write_text(json.dumps(doc, indent=1))
  csv_path = out / "metrics.csv"
  n_layers = len(metrics["max_logit"][0]) if metrics["max_logit"] else 0
  val = dict(zip(metrics["val_step"], metrics["val_loss"]))
  header = ["step", "loss", "lr", "val_loss"] + [f"max_logit_layer{i}" for i in range(n_layers)]
  lines = [",".join(header)]
  for i, s in enumerate(metrics["step"]):
    v = val.get(s + 1, "")
    row = [s, f"{metrics['loss'][i]:.6f}", f"{metrics['lr'][i]:.6g}",
           f"{v:.6f}" if v != "" else ""]
    row += [f"{x:.4f}" for x in metrics["max_logit"][i]]
    lines.append(",".join(str(c) for c in row))
  csv_path.write_text("\n".join(lines) + "\n")
  return json_path, csv_path


def smooth(xs: Sequence[float], window: int = 10) -> np.ndarray:
  """Trailing moving average (shorter at the start)."""
  a = np.asarray(xs, dtype=np.float64)
  if len(a) == 0 or window <= 1:
    return a
  c = np.cumsum(np.insert(a, 0, 0.0))
  idx = np.arange(1, len(a) + 1)
  lo = np.maximum(0, idx - window)
  return (c[idx] - c[lo]) / (idx - lo)


def plot_run(metrics: dict[str, list[Any]], out_dir: str | os.PathLike[str],
             title: str = "", tau: float | None = None) -> list[Path]:
  """``loss.png`` (train, smoothed, and validation) and ``max_logit.png`` (per layer)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(metrics["step"], metrics["loss"], alpha=0.3, color="C0", label="train")
  ax.plot(metrics["step"], smooth(metrics["loss"]), color="C0", label="train (smoothed)")
  ax.plot(metrics["val_step"], metrics["val_loss"], "o-", color="C1", label="validation")
  ax.set(xlabel="step", ylabel="loss (nats/byte)", title=f"{title} loss".strip())
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(out / "loss.png")
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  per_layer = np.asarray(metrics["max_logit"])
  for i in range(per_layer.shape[1] if per_layer.ndim == 2 else 0):
    ax.plot(metrics["step"], per_layer[:, i], label=f"layer {i}")
  if tau is not None:
    ax.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
  ax.set(xlabel="step", ylabel="max pre-softmax logit", title=f"{title} max logit".strip())
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(out / "max_logit.png")
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return paths


def steps_to_reach(steps: Iterable[int], losses: Iterable[float], target: float
                   ) -> float | None:
  """First step at which a loss curve reaches ``target``, linearly interpolated.

  ``None`` when it never does.
  """
  prev: tuple[int, float] | None = None
  for s, v in zip(steps, losses):
    if v <= target:
      if prev is None or not math.isfinite(prev[1]):
        return float(s)
      s0, v0 = prev
      return s0 + (v0 - target) / (v0 - v) * (s - s0) if v0 != v else float(s)
    prev = (s, v)
  return None
