"""Writes notebooks/*.ipynb from the cell sources below (outputs cleared).

Run ``python notebooks/make_notebooks.py`` after editing; the notebooks are
generated so that their shared set-up cell stays identical.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
# Set-up (Colab-ready): find or fetch the repository, install muonclip_jax if it is missing.
# REPO is a placeholder: set it to this repository's URL when running outside a checkout.
REPO = "https://github.com/<owner>/muonclip_jax"
import os, pathlib, subprocess, sys
{pre}here = pathlib.Path.cwd().resolve()
root = next((p for p in (here, *here.parents) if (p / "examples" / "lm" / "trainer.py").is_file()), None)
if root is None:  # e.g. on Colab: examples/lm/trainer.py (model, data, training loop) lives in the repo
    subprocess.run(["git", "clone", "-q", "--depth=1", REPO, "muonclip_jax_repo"], check=True)
    root = pathlib.Path("muonclip_jax_repo").resolve()
try:
    import muonclip_jax
except ImportError:
    if (root / "muonclip_jax" / "__init__.py").is_file():
        sys.path.insert(0, str(root))          # a source checkout: import it in place
    else:
        %pip install -q "git+{{REPO}}.git"
    import muonclip_jax
sys.path.insert(0, str(root))            # examples/lm/trainer.py: the experiment harness
SMALL = os.environ.get("MUONCLIP_NB_SMALL") == "1"  # tiny settings (the test suite sets this)
print("muonclip_jax from", pathlib.Path(muonclip_jax.__file__).parent, "| small:", SMALL)'''


def setup(pre: str = "") -> nbformat.NotebookNode:
  """The shared set-up cell; ``pre`` runs before anything imports jax."""
  return new_code_cell(SETUP.format(pre=pre))


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

`examples/lm/trainer.py` holds a small byte-level transformer (Flax NNX, RoPE). Its attention calls
`muonclip_jax.dot_product_attention(..., module=self)`, which **sows each head's largest
pre-softmax logit** as an `nnx.Intermediate`. The training step captures those statistics
and hands them to the optimiser: `tx.update(grads, state, params, max_logits=stats)`.
QK-Clip then rescales the query/key weights of every head whose logit exceeded τ."""),
    code("""from flax import nnx
from examples.lm import trainer as lm

cfg = lm.ModelConfig(d_model=32 if SMALL else 128, num_layers=1 if SMALL else 2, num_heads=4)
graphdef, params = lm.init_model(cfg, seed=0)
data = lm.ByteData(lm.default_corpus(), seq_len=32 if SMALL else 64)
steps = 10 if SMALL else 150
tau = 10.0   # low on purpose, so that QK-Clip acts within a short run
tx = muonclip_jax.muonclip(optax.warmup_cosine_decay_schedule(0.0, 0.02, steps // 5, steps, 2e-3), tau=tau)
opt_state = tx.init(params)

def loss_fn(params, x, y):
    model = nnx.merge(graphdef, params)
    logits, stats = nnx.capture(model, nnx.Intermediate)(x)     # stats: the sown max logits
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, nnx.to_pure_dict(stats)

@jax.jit
def train_step(params, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, max_logits=stats)
    return optax.apply_updates(params, updates), opt_state, loss, stats

losses, max_logits = [], []
for step in range(steps):
    x, y = data.train_batch(seed=0, step=step, batch=16)
    params, opt_state, loss, stats = train_step(params, opt_state, x, y)
    losses.append(float(loss))
    max_logits.append(np.asarray(lm.head_max_logits(stats, cfg.num_layers)).max())
print(f"loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} nats/byte; "
      f"heads clipped in total: {lm.clip_telemetry(opt_state)['clipped_total']}")"""),
    code("""fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
a.plot(losses); a.set(xlabel="step", ylabel="train loss (nats/byte)", title="Loss")
b.plot(max_logits, label="max logit (any head)"); b.axhline(tau, ls="--", c="k", label="tau")
b.set(xlabel="step", title="Max pre-softmax logit"); b.legend()
for ax in (a, b): ax.grid(alpha=0.3)
plt.show()"""),
    md("""The same loop, with metrics, plots, checkpoints and a device mesh, is
`python -m examples.lm.train` (see `--help`). Next: `02_qk_clip.ipynb` shows the logit
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
    code("""import numpy as np, matplotlib.pyplot as plt
from examples.lm import trainer as lm

SEQ = 16 if SMALL else 64
data = lm.ByteData(lm.default_corpus(), seq_len=SEQ)
model = lm.ModelConfig(d_model=32 if SMALL else 128, num_layers=1 if SMALL else 2, num_heads=4)
STEPS = 12 if SMALL else 300
TAU = 3.0 if SMALL else 30.0

runs = {}
for name in ["muon", "muonclip"]:
    cfg = lm.RunConfig(model=model, steps=STEPS, batch=4 if SMALL else 16, seq_len=SEQ,
                       eval_every=max(1, STEPS // 10), eval_batches=2 if SMALL else 8,
                       optim=lm.OptimConfig(name=name, lr=0.03, tau=TAU, weight_decay=0.0,
                                            schedule="constant", warmup=10, total_steps=STEPS))
    trainer = lm.Trainer(cfg, data)
    runs[name] = trainer.run()
    peak = np.max(runs[name]["max_logit"])
    print(f"{name:8s}: peak max logit {peak:8.1f}, final val loss {runs[name]['val_loss'][-1]:.4f}",
          lm.clip_telemetry(trainer.opt_state))"""),
    md("""### Per-head max logits
Each line is one head (`head_max_logit` has shape `[steps, layers, heads]`): solid for plain Muon,
dashed for MuonClip."""),
    code("""L = model.num_layers
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
    ax.plot(m["step"], lm.smooth(m["loss"], 10), color=c, alpha=0.6, label=f"{name} train (smoothed)")
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
    code("""import numpy as np, matplotlib.pyplot as plt
from examples.lm import trainer as lm

SEQ = 16 if SMALL else 64
data = lm.ByteData(lm.default_corpus(), seq_len=SEQ)
model = lm.ModelConfig(d_model=32 if SMALL else 128, num_layers=1 if SMALL else 2, num_heads=4)
STEPS = 10 if SMALL else 300
sweep = {"adamw": [4e-3] if SMALL else [1e-3, 2e-3, 4e-3],
         "muon": [2e-2] if SMALL else [5e-3, 1e-2, 2e-2]}

curves = {}
for name, lrs in sweep.items():
    for lr in lrs:
        cfg = lm.RunConfig(model=model, steps=STEPS, batch=4 if SMALL else 16, seq_len=SEQ,
                           eval_every=max(1, STEPS // 15), eval_batches=2 if SMALL else 8,
                           optim=lm.OptimConfig(name=name, lr=lr, warmup=max(1, STEPS // 15),
                                                total_steps=STEPS))
        m = lm.Trainer(cfg, data).run()
        curves[name, lr] = (m["val_step"], m["val_loss"])
        print(f"{name:6s} lr {lr:<6g} final validation loss {m['val_loss'][-1]:.4f}")"""),
    code("""best = {name: min((c[1][-1], lr) for (n, lr), c in curves.items() if n == name) for name in sweep}
target = best["adamw"][0]
hits = {lr: lm.steps_to_reach(*curves["muon", lr], target) for lr in sweep["muon"]}
reached = {lr: s for lr, s in hits.items() if s is not None}
fig, ax = plt.subplots(figsize=(6.5, 4))
for (name, lr), (s, v) in curves.items():
    ax.plot(s[1:], v[1:], "-" if name == "muon" else "--", label=f"{name} lr {lr:g}")
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
is in the first cell; restart the runtime if jax was already imported), trains the transformer of
`examples/lm/trainer.py` sharded on a `data × model` mesh, and checkpoints and resumes it with the package's orbax helpers."""),
    setup(pre='os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") '
              '+ " --xla_force_host_platform_device_count=8").strip()\n'
              'os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a mesh of host devices\n'),
    code("""import jax, numpy as np
from examples.lm import trainer as lm
from jax.sharding import NamedSharding
print(jax.devices())
assert len(jax.devices()) >= 8, "restart the runtime: XLA_FLAGS must be set before jax starts"

mesh = lm.make_mesh((4, 2))            # axes ('data', 'model')
model = lm.ModelConfig(d_model=32 if SMALL else 128, num_layers=1 if SMALL else 2, num_heads=4)
_, params = lm.init_model(model, seed=0)
sharded = lm.shard_params(params, mesh)
for path, x in jax.tree_util.tree_flatten_with_path(sharded)[0][:6]:
    print(jax.tree_util.keystr(path), x.shape, x.sharding.spec)"""),
    md("""Which matrices Muon orthogonalises where (device-local plan):"""),
    code("""print(muonclip_jax.muon_sharding_summary(sharded, mesh))"""),
    md("""## Train on the mesh
`lm.Trainer` shards the batch over `data` and the parameters as above, and builds
`muonclip(..., mesh=mesh)`. The loss matches a single-device run up to floating-point
reassociation."""),
    code("""SEQ = 16 if SMALL else 64
data = lm.ByteData(lm.default_corpus(), seq_len=SEQ)
STEPS = 8 if SMALL else 100
def run_cfg(mesh_shape):
    return lm.RunConfig(model=model, steps=STEPS, batch=8 if SMALL else 16, seq_len=SEQ,
                        eval_every=STEPS // 2, eval_batches=2, mesh=mesh_shape,
                        optim=lm.OptimConfig(name="muonclip", lr=0.02, tau=10.0, warmup=5,
                                             total_steps=STEPS))
single = lm.Trainer(run_cfg(None), data); single.run()
on_mesh = lm.Trainer(run_cfg((4, 2)), data); on_mesh.run()
print("single device:", np.round(single.metrics["loss"][-3:], 4))
print("4x2 mesh:     ", np.round(on_mesh.metrics["loss"][-3:], 4))
k = on_mesh.params["blocks"][0]["fc_in"]["kernel"]
print("fc_in kernel", k.shape, "sharding", k.sharding.spec, "on", len(k.sharding.device_set), "devices")"""),
    md("""## Checkpoint and resume
Stop half-way, save with orbax, restore into a fresh trainer (arrays come back with their
shardings) and continue: the result equals the uninterrupted run exactly, because the batches
are a function of `(seed, step)`."""),
    code("""import tempfile
manager = muonclip_jax.make_checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2)
first = lm.Trainer(run_cfg((4, 2)), data)
first.run(steps=STEPS // 2)
muonclip_jax.save_checkpoint(manager, first.step, first.params, first.opt_state)

resumed = lm.Trainer(run_cfg((4, 2)), data)        # fresh state: the restore target's shardings
step, params, opt_state = muonclip_jax.restore_latest_valid(manager, resumed.params, resumed.opt_state)
manager.close()
resumed.load_state({"params": params, "opt_state": opt_state, "step": step})
print("restored step", step, "| fc_in sharding:", params["blocks"][0]["fc_in"]["kernel"].sharding.spec)
resumed.run()
same = all(np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(on_mesh.params), jax.tree.leaves(resumed.params)))
print("resumed run equals the uninterrupted run:", same)
assert same"""),
    md("""From the command line: `python -m examples.lm.train --mesh 4x2 --ckpt-dir ck --steps 200`,
interrupt it, and run the same command with `--resume`."""),
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
