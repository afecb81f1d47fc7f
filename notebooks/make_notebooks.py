"""Writes notebooks/*.ipynb from the cell sources below (outputs cleared).

Run ``python notebooks/make_notebooks.py`` after editing; the notebooks are
generated so that their shared set-up cell stays identical.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# Where the notebooks install muonclip_jax from (with its [examples] extra: matplotlib, tqdm).
# The one place to change it, e.g. for a fork; README.md and docs/notebooks.md point here.
PACKAGE_URL = "https://github.com/<owner>/muonclip_jax"

SETUP = """\
# Set-up (Colab-ready): install muonclip_jax from its repository unless it is installed already
# (a checkout with `pip install -e .`, as in the test suite, skips the install).
import importlib.util, os, pathlib
if importlib.util.find_spec("muonclip_jax") is None:
    %pip install -q "muonclip_jax[examples] @ git+{url}"
{{pre}}import muonclip_jax
SMALL = os.environ.get("MUONCLIP_NB_SMALL") == "1"  # tiny settings (the test suite sets this)
print("muonclip_jax from", pathlib.Path(muonclip_jax.__file__).parent, "| small:", SMALL)""".format(
    url=PACKAGE_URL)

# The notebooks' own model, data and loop: one cell, the same in each notebook (generated).
LM_CELL = """\
# A byte-level transformer (Flax NNX) on text of Python's standard library (no download),
# and its training loop. The attention sows each head's max logit for QK-Clip.
import sysconfig
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
FILES = ["functools.py", "collections/__init__.py", "textwrap.py", "string.py", "heapq.py",
         "bisect.py", "random.py", "statistics.py", "fractions.py", "dataclasses.py"]
tokens = np.frombuffer(b"".join((lib / f).read_bytes() for f in FILES if (lib / f).is_file()), np.uint8)
SPLIT = int(0.9 * len(tokens))                   # training head, validation tail

def get_batch(step, batch, seq_len, val=False):
    \"\"\"Windows of the training (or validation) bytes, a function of the step: inputs, targets.\"\"\"
    part = tokens[SPLIT:] if val else tokens[:SPLIT]
    starts = np.random.default_rng([step, int(val)]).integers(0, len(part) - seq_len - 1, batch)
    w = np.stack([part[i:i + seq_len + 1] for i in starts]).astype(np.int32)
    return w[:, :-1], w[:, 1:]

class Attention(nnx.Module):
    def __init__(self, d, heads, *, rngs):
        self.query, self.key, self.value = (
            nnx.LinearGeneral(d, (heads, d // heads), use_bias=False, rngs=rngs) for _ in range(3))
        self.out = nnx.LinearGeneral((heads, d // heads), d, axis=(-2, -1), use_bias=False, rngs=rngs)
    def __call__(self, x):                       # sows max_logits next to query and key
        y = muonclip_jax.dot_product_attention(self.query(x), self.key(x), self.value(x),
                                               is_causal=True, module=self)
        return self.out(y)

class Block(nnx.Module):
    def __init__(self, d, heads, *, rngs):
        self.attn_norm, self.mlp_norm = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.attn = Attention(d, heads, rngs=rngs)
        self.fc_in = nnx.Linear(d, 4 * d, use_bias=False, rngs=rngs)
        self.fc_out = nnx.Linear(4 * d, d, use_bias=False, rngs=rngs)
    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.fc_out(jax.nn.gelu(self.fc_in(self.mlp_norm(x))))

class LM(nnx.Module):
    def __init__(self, d_model, layers, heads, seq_len, *, rngs):
        self.embed = nnx.Embed(256, d_model, rngs=rngs)
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, d_model)))
        self.blocks = nnx.List([Block(d_model, heads, rngs=rngs) for _ in range(layers)])
        self.final_norm = nnx.RMSNorm(d_model, rngs=rngs)
        self.lm_head = nnx.Linear(d_model, 256, use_bias=False, rngs=rngs)
    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos_embed[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))

def loss_fn(params, graphdef, x, y):
    logits, stats = nnx.capture(nnx.merge(graphdef, params), nnx.Intermediate)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.to_pure_dict(stats)         # stats: every layer's sown max_logits

def shard(params, mesh):                         # a matrix's first axis over 'data' where it divides
    spec = lambda x: P("data") if x.ndim >= 2 and x.shape[0] % mesh.shape["data"] == 0 else P()
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), params)

def run(tx, cfg, steps, batch, *, eval_every=0, mesh=None, state=None):
    \"\"\"Trains to `steps` from `state` = (step, params, opt_state), or from scratch.

    Returns the final state and the metrics: loss, each head's max logit [layers, heads],
    validation loss every `eval_every` steps.
    \"\"\"
    graphdef, params = nnx.split(LM(**cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    if mesh is not None:
        params = shard(params, mesh)
    start, params, opt_state = state or (0, params, tx.init(params))
    put, layout = jnp.asarray, None
    if mesh is not None:                         # the step keeps this layout: one compilation
        opt_state = shard(opt_state, mesh)
        layout = jax.tree.map(lambda x: x.sharding, (params, opt_state))
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))

    @jax.jit
    def train_step(params, opt_state, x, y):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graphdef, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, max_logits=stats)  # QK-Clip reads it
        params = optax.apply_updates(params, updates)
        if layout is not None:
            params, opt_state = jax.lax.with_sharding_constraint((params, opt_state), layout)
        return params, opt_state, loss, jnp.stack(jax.tree.leaves(stats))

    val_loss = jax.jit(lambda p, x, y: loss_fn(p, graphdef, x, y)[0])
    m = {"step": [], "loss": [], "head_max_logit": [], "val_step": [], "val_loss": []}
    for step in range(start, steps):
        x, y = get_batch(step, batch, cfg["seq_len"])
        params, opt_state, loss, heads = train_step(params, opt_state, put(x), put(y))
        m["step"].append(step); m["loss"].append(float(loss)); m["head_max_logit"].append(np.asarray(heads))
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            vals = [val_loss(params, *map(put, get_batch(i, batch, cfg["seq_len"], val=True))) for i in range(2)]
            m["val_step"].append(step + 1); m["val_loss"].append(float(np.mean(vals)))
    m["max_logit"] = np.asarray(m["head_max_logit"]).max(axis=-1) if m["step"] else None  # [steps, layers]
    return (steps, params, opt_state), m

def clipped_total(opt_state):                    # heads clipped over the run (MuonClip only)
    return int(muonclip_jax.qk_clip_metrics(opt_state)["qk_clip/heads_clipped_total"])"""


def setup(pre: str = "") -> nbformat.NotebookNode:
  """The shared set-up cell; ``pre`` runs before anything imports jax."""
  return new_code_cell(SETUP.format(pre=pre))


def lm_cell() -> nbformat.NotebookNode:
  """The notebooks' model, data and training loop."""
  return new_code_cell(LM_CELL)


def notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
  """A Python 3 notebook of ``cells``, without outputs."""
  nb = new_notebook(cells=cells)
  for i, cell in enumerate(nb.cells):  # Stable ids: regenerating changes only what changed.
    cell.id = f"cell-{i:02d}"
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                               "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.metadata["accelerator"] = "CPU"
  return nb


md, code = new_markdown_cell, new_code_cell

QUICKSTART = notebook([
    md("""# 01 · Quickstart: Muon and MuonClip as optax transformations

`muonclip_jax` provides **Muon** (momentum → Newton–Schulz orthogonalisation → AdamW-matched
RMS scaling → decoupled weight decay) and **QK-Clip** as composable optax transformations,
and **MuonClip** (Kimi K2) as their chain. This notebook

1. shows what Newton–Schulz orthogonalisation does to the singular values of an update,
2. chains Muon into an ordinary optax pipeline,
3. trains a small byte-level transformer with MuonClip, passing the attention statistics
   to the optimiser.

Runs on a CPU in a minute or two."""),
    setup(),
    md("""## 1. Orthogonalisation flattens the spectrum

Muon replaces the momentum matrix `M = U S Vᵀ` by (approximately) `U Vᵀ`: every singular value
is pushed towards 1, so rare directions get as large a step as dominant ones. Five steps of
Keller Jordan's quintic iteration put most singular values in roughly [0.7, 1.2]; the very
smallest (here a spectrum spanning three decades) are lifted but not all the way. The Polar
Express coefficients get closer to 1 in the same number of steps."""),
    code("""import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt

n, m = (64, 32) if SMALL else (256, 128)
ku, kv = jax.random.split(jax.random.key(0))
u, _ = jnp.linalg.qr(jax.random.normal(ku, (n, m)))
v, _ = jnp.linalg.qr(jax.random.normal(kv, (m, m)))
s = jnp.logspace(0, -3, m)                       # a gradient-like, fast-decaying spectrum
g = (u * s) @ v.T

sv = lambda x: np.linalg.svd(np.asarray(x), compute_uv=False)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.semilogy(sv(g / jnp.linalg.norm(g)), "k", label="input (Frobenius-normalised)")
for preset in ["keller", "polar_express"]:
    ax.semilogy(sv(muonclip_jax.orthogonalize(g, coeffs=preset)), label=f"NS, {preset}")
ax.set(xlabel="index", ylabel="singular value", title="Singular values before / after Newton–Schulz")
ax.legend(); ax.grid(alpha=0.3); plt.show()
for preset in ["keller", "polar_express"]:
    o = sv(muonclip_jax.orthogonalize(g, coeffs=preset))
    print(f"{preset:14s} singular values in [{o.min():.3f}, {o.max():.3f}], median {np.median(o):.3f}, "
          f"{np.mean((o > 0.7) & (o < 1.2)):.0%} in [0.7, 1.2]")"""),
    md("""## 2. Muon in an optax pipeline

`muon()` is an `optax.partition`: Muon on hidden matrices, AdamW (β = 0.9, 0.95) on the
embedding, the LM head, norms and biases — routed by parameter path (see
`default_param_labels`). It chains like any optax transformation."""),
    code("""import optax

params = {
    "embed": {"embedding": jax.random.normal(jax.random.key(1), (256, 64)) * 0.02},
    "mlp": {"kernel": jax.random.normal(jax.random.key(2), (64, 256)) * 0.02},
    "norm": {"scale": jnp.ones(64)},
    "lm_head": {"kernel": jax.random.normal(jax.random.key(3), (64, 256)) * 0.02},
}
print(muonclip_jax.default_param_labels(params))

tx = optax.chain(optax.clip_by_global_norm(1.0),
                 muonclip_jax.muon(learning_rate=0.02, weight_decay=0.1))
state = tx.init(params)
grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(4), p.shape), params)
updates, state = jax.jit(tx.update)(grads, state, params)
rms = jax.tree.map(lambda u: float(jnp.sqrt(jnp.mean(u ** 2))), updates)
print("update RMS per leaf (lr 0.02):", rms)"""),
    md("""The Muon leaf's update RMS is ≈ `0.02 × 0.2` (Moonlight's AdamW-matching scale), so
AdamW's learning rate and weight decay carry over.

## 3. MuonClip on a transformer

The next cell holds a small byte-level transformer (Flax NNX) and its loop. Its attention calls
`muonclip_jax.dot_product_attention(..., module=self)`, which **sows each head's largest
pre-softmax logit** as an `nnx.Intermediate`. The training step captures those statistics
and hands them to the optimiser: `tx.update(grads, state, params, max_logits=stats)`.
QK-Clip then rescales the query/key weights of every head whose logit exceeded τ."""),
    lm_cell(),
    code("""cfg = dict(d_model=32 if SMALL else 128, layers=1 if SMALL else 2, heads=4, seq_len=32 if SMALL else 64)
steps = 10 if SMALL else 150
tau = 10.0   # low on purpose, so that QK-Clip acts within a short run
tx = muonclip_jax.muonclip(optax.warmup_cosine_decay_schedule(0.0, 0.02, steps // 5, steps, 2e-3), tau=tau)
(_, params, opt_state), m = run(tx, cfg, steps, batch=16)
losses, max_logits = m["loss"], m["max_logit"].max(axis=1)
print(f"loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} nats/byte; "
      f"heads clipped in total: {clipped_total(opt_state)}")"""),
    code("""fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
a.plot(losses); a.set(xlabel="step", ylabel="train loss (nats/byte)", title="Loss")
b.plot(max_logits, label="max logit (any head)"); b.axhline(tau, ls="--", c="k", label="tau")
b.set(xlabel="step", title="Max pre-softmax logit"); b.legend()
for ax in (a, b): ax.grid(alpha=0.3)
plt.show()"""),
    md("""The same loop, with metrics, plots, checkpoints and a device mesh, is
`python -m examples.lm.train` in a checkout of the repository (see `--help`). Next: `02_qk_clip.ipynb` shows the logit
explosion that QK-Clip prevents."""),
])

QK_CLIP = notebook([
    md("""# 02 · QK-Clip: taming the attention-logit explosion

With Muon, the query and key weights of a head can grow until its pre-softmax logits reach
the thousands (Kimi K2 saw > 1000 at 9B active parameters, with loss spikes). QK-Clip bounds
them: after each update, every head whose largest logit `S_max^h` exceeded τ has its query and
key weights multiplied by `sqrt(τ / S_max^h)`.

Here a tiny transformer is trained twice from the same initialisation and batches — plain Muon
and MuonClip — at a high learning rate **without weight decay**, where plain Muon's logits
run away. We plot every head's max logit and the loss curves."""),
    setup(),
    lm_cell(),
    code("""import matplotlib.pyplot as plt

cfg = dict(d_model=32 if SMALL else 128, layers=1 if SMALL else 2, heads=4, seq_len=16 if SMALL else 64)
STEPS = 12 if SMALL else 300
TAU = 3.0 if SMALL else 30.0
lr = optax.join_schedules([optax.linear_schedule(0.0, 0.03, 10), optax.constant_schedule(0.03)], [10])

runs = {}
for name in ["muon", "muonclip"]:
    tx = (muonclip_jax.muon(lr, weight_decay=0.0) if name == "muon"
          else muonclip_jax.muonclip(lr, tau=TAU, weight_decay=0.0))
    (_, _, opt_state), runs[name] = run(tx, cfg, STEPS, batch=4 if SMALL else 16,
                                        eval_every=max(1, STEPS // 10))
    peak = np.max(runs[name]["max_logit"])
    print(f"{name:8s}: peak max logit {peak:8.1f}, final val loss {runs[name]['val_loss'][-1]:.4f}",
          f"heads clipped: {clipped_total(opt_state)}" if name == "muonclip" else "")"""),
    md("""### Per-head max logits
Each line is one head (`head_max_logit` has shape `[steps, layers, heads]`): solid for plain Muon,
dashed for MuonClip."""),
    code("""L = cfg["layers"]
fig, axes = plt.subplots(1, L, figsize=(5 * L, 3.6), squeeze=False)
for layer, ax in enumerate(axes[0]):
    for name, ls in [("muon", "-"), ("muonclip", "--")]:
        h = np.asarray(runs[name]["head_max_logit"])[:, layer, :]
        for head in range(h.shape[1]):
            ax.plot(h[:, head], ls, color=f"C{head}", lw=1,
                    label=f"{name} head {head}" if layer == 0 else None)
    ax.axhline(TAU, color="k", ls=":", label="tau" if layer == 0 else None)
    ax.set(yscale="log", xlabel="step", ylabel="max logit", title=f"layer {layer}")
    ax.grid(alpha=0.3)
axes[0][0].legend(fontsize=6, ncol=2)
plt.tight_layout(); plt.show()"""),
    code("""fig, ax = plt.subplots(figsize=(6, 3.6))
for name, c in [("muon", "C3"), ("muonclip", "C0")]:
    m = runs[name]
    smooth = np.convolve(m["loss"], np.ones(5) / 5, mode="valid")     # 5-step moving average
    ax.plot(m["step"][4:], smooth, color=c, alpha=0.6, label=f"{name} train (smoothed)")
    ax.plot(m["val_step"], m["val_loss"], "o-", color=c, label=f"{name} validation")
ax.set(xlabel="step", ylabel="loss (nats/byte)", ylim=(None, 4)); ax.grid(alpha=0.3); ax.legend()
plt.show()
mu, mc = runs["muon"]["val_loss"][-1], runs["muonclip"]["val_loss"][-1]
print(f"final validation loss: Muon {mu:.4f}, MuonClip {mc:.4f} ({100 * (mc / mu - 1):+.2f} %)")"""),
    md("""MuonClip's logits stop at τ (the statistic of a step can overshoot τ by a few per cent: it is
measured before that step's clip, on a new batch, and the step's own update adds to it); compare
the final validation losses printed above.
The full study, with two seeds and its targets, is `python -m benchmarks.logit_explosion`
(`benchmarks/RESULTS.md`).

**Layouts.** QK-Clip found the query/key kernels next to each sown statistic by name (Flax's
attention layout). For GQA, fused QKV, MLA or QK-norm, pass a layout:
`muonclip_jax.muonclip(lr, tau=..., layouts={"*/attn": muonclip_jax.fused_qkv("qkv", num_heads=8)})`."""),
])

MUON_VS_ADAMW = notebook([
    md("""# 03 · Muon vs AdamW: token efficiency in miniature

Moonlight reports that Muon reaches AdamW's loss with about half the training compute. Here is
the experiment in miniature: a byte-level transformer trained with AdamW and with Muon for the
same number of steps (a small learning-rate sweep each, one seed), then: *at which step does
Muon's validation loss reach AdamW's best final validation loss?*

The full study (three optimisers, three learning rates each, two seeds) is
`python -m benchmarks.token_efficiency`; its figures are in `benchmarks/RESULTS.md`."""),
    setup(),
    lm_cell(),
    code("""import matplotlib.pyplot as plt

cfg = dict(d_model=32 if SMALL else 128, layers=1 if SMALL else 2, heads=4, seq_len=16 if SMALL else 64)
STEPS = 10 if SMALL else 300
sweep = {"adamw": [4e-3] if SMALL else [1e-3, 2e-3, 4e-3],
         "muon": [2e-2] if SMALL else [5e-3, 1e-2, 2e-2]}

curves = {}
for name, lrs in sweep.items():
    for lr in lrs:
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, STEPS // 15), STEPS, lr * 0.1)
        tx = (optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1) if name == "adamw"
              else muonclip_jax.muon(sched, weight_decay=0.1))
        _, m = run(tx, cfg, STEPS, batch=4 if SMALL else 16, eval_every=max(1, STEPS // 15))
        curves[name, lr] = (m["val_step"], m["val_loss"])
        print(f"{name:6s} lr {lr:<6g} final validation loss {m['val_loss'][-1]:.4f}")"""),
    code("""best = {name: min((c[1][-1], lr) for (n, lr), c in curves.items() if n == name) for name in sweep}
target = best["adamw"][0]
reach = lambda steps, losses: next((s for s, v in zip(steps, losses) if v <= target), None)
hits = {lr: reach(*curves["muon", lr]) for lr in sweep["muon"]}
reached = {lr: s for lr, s in hits.items() if s is not None}
fig, ax = plt.subplots(figsize=(6.5, 4))
for (name, lr), (s, v) in curves.items():
    ax.plot(s, v, "-" if name == "muon" else "--", label=f"{name} lr {lr:g}")
ax.axhline(target, color="k", lw=0.8, ls=":", label="AdamW best final")
ax.set(xlabel="step", ylabel="validation loss (nats/byte)", ylim=(target - 0.2, target + 0.8))
ax.grid(alpha=0.3); ax.legend(fontsize=8); plt.show()
if reached:
    lr = min(reached, key=reached.get)
    print(f"AdamW's best final loss {target:.4f} (lr {best['adamw'][1]:g}) is reached by Muon "
          f"(lr {lr:g}) at step {reached[lr]:.0f} of {STEPS}: {reached[lr] / STEPS:.2f}x the steps")
else:
    print(f"Muon did not reach AdamW's best final loss {target:.4f} within {STEPS} steps")"""),
    md("""The step is read off Muon's own cosine-scheduled run, before its learning rate has decayed,
which understates Muon's advantage a little: a run *planned* for that many steps would have
annealed and done better."""),
])

SHARDING = notebook([
    md("""# 04 · Sharded training: a device mesh, device-local Newton–Schulz, checkpoints

Newton–Schulz multiplies whole matrices. If a parameter is sharded (FSDP, tensor parallel),
letting XLA partition each product puts collectives inside every iteration. With
`muon(..., mesh=mesh)` each matrix is moved whole to one device (one reshard in), orthogonalised
there without communication, and moved back (one reshard out).

This notebook runs on **8 host CPU devices** (the XLA flag must be set before jax starts, so it
is in the first cell; restart the runtime if jax was already imported), trains a small transformer
sharded on a `data × model` mesh, and checkpoints and resumes it with the package's orbax helpers."""),
    setup(pre='os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") '
              '+ " --xla_force_host_platform_device_count=8").strip()\n'
              'os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a mesh of host devices\n'),
    lm_cell(),
    code("""print(jax.devices())
assert len(jax.devices()) >= 8, "restart the runtime: XLA_FLAGS must be set before jax starts"

mesh = jax.make_mesh((4, 2), ("data", "model"),   # XLA propagates the shardings (Auto axes)
                     axis_types=(jax.sharding.AxisType.Auto,) * 2)
cfg = dict(d_model=32 if SMALL else 128, layers=1 if SMALL else 2, heads=4, seq_len=16 if SMALL else 64)
_, params = nnx.split(LM(**cfg, rngs=nnx.Rngs(0)), nnx.Param)
sharded = shard(nnx.to_pure_dict(params), mesh)
for path, x in jax.tree_util.tree_flatten_with_path(sharded)[0][:6]:
    print(jax.tree_util.keystr(path), x.shape, x.sharding.spec)"""),
    md("""Which matrices Muon orthogonalises where (device-local plan):"""),
    code("""print(muonclip_jax.muon_sharding_summary(sharded, mesh))"""),
    md("""## Train on the mesh
`run(..., mesh=mesh)` shards the batch over `data` and the parameters as above, with
`muonclip(..., mesh=mesh)`. The loss matches a single-device run up to floating-point
reassociation."""),
    code("""STEPS = 8 if SMALL else 100
def tx_for(mesh):
    return muonclip_jax.muonclip(optax.warmup_cosine_decay_schedule(0.0, 0.02, 5, STEPS, 2e-3),
                                 tau=10.0, mesh=mesh)
_, single = run(tx_for(None), cfg, STEPS, batch=8 if SMALL else 16)
(_, on_mesh, _), mesh_m = run(tx_for(mesh), cfg, STEPS, batch=8 if SMALL else 16, mesh=mesh)
print("single device:", np.round(single["loss"][-3:], 4))
print("4x2 mesh:     ", np.round(mesh_m["loss"][-3:], 4))
k = on_mesh["blocks"][0]["fc_in"]["kernel"]
print("fc_in kernel", k.shape, "sharding", k.sharding.spec, "on", len(k.sharding.device_set), "devices")"""),
    md("""## Checkpoint and resume
Stop half-way, save with orbax, restore into fresh state (arrays come back with their
shardings) and continue: the result equals the uninterrupted run exactly, because the batches
are a function of the step."""),
    code("""import tempfile
tx = tx_for(mesh)
manager = muonclip_jax.make_checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2)
(half, params, opt_state), _ = run(tx, cfg, STEPS // 2, batch=8 if SMALL else 16, mesh=mesh)
muonclip_jax.save_checkpoint(manager, half, params, opt_state)

(_, fresh_params, fresh_state), _ = run(tx, cfg, 0, batch=8 if SMALL else 16, mesh=mesh)  # restore targets
step, params, opt_state = muonclip_jax.restore_latest_valid(manager, fresh_params, fresh_state)
manager.close()
print("restored step", step, "| fc_in sharding:", params["blocks"][0]["fc_in"]["kernel"].sharding.spec)
(_, resumed, _), _ = run(tx, cfg, STEPS, batch=8 if SMALL else 16, mesh=mesh,
                         state=(step, params, opt_state))
same = all(np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(on_mesh), jax.tree.leaves(resumed)))
print("resumed run equals the uninterrupted run:", same)
assert same"""),
    md("""The pod trainer of the repository's `examples/lm/` does all of this with asynchronous
checkpoints and several processes: from a checkout,
`python -m examples.lm.train --mesh 4x2 --ckpt-dir ck --steps 200`, interrupt it, and run the
same command with `--resume`."""),
])

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_qk_clip.ipynb": QK_CLIP,
    "03_muon_vs_adamw.ipynb": MUON_VS_ADAMW,
    "04_sharding.ipynb": SHARDING,
}


def main() -> None:
  """Validates and writes every notebook."""
  for name, nb in NOTEBOOKS.items():
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)
    print("wrote", HERE / name)


if __name__ == "__main__":
  main()
