"""Metrics files (``metrics.json``, ``metrics.csv``) and plots (``loss.png``, ``max_logit.png``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  from .trainer import RunConfig


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
  paths.append(_save(plt, fig, ax, out / "loss.png"))

  fig, ax = plt.subplots(figsize=(6, 4))
  per_layer = np.asarray(metrics["max_logit"])
  for i in range(per_layer.shape[1] if per_layer.ndim == 2 else 0):
    ax.plot(metrics["step"], per_layer[:, i], label=f"layer {i}")
  if tau is not None:
    ax.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
  ax.set(xlabel="step", ylabel="max pre-softmax logit", title=f"{title} max logit".strip())
  paths.append(_save(plt, fig, ax, out / "max_logit.png"))
  return paths


def _save(plt: Any, fig: Any, ax: Any, path: Path) -> Path:
  """Legend, grid and layout of one figure, written to ``path`` and closed."""
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
