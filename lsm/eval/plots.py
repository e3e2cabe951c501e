"""The evaluation pictures: lines (accuracy or perplexity against one knob) and heatmaps (a grid of
two), written as PNG with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

import numpy as np


def _pyplot():
  import matplotlib  # noqa: PLC0415 — optional dependency (the `plot` extra)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def line_plot(path, lines: list[tuple[str, list, list]], *, xlabel: str, ylabel: str, title: str,
              log2_x: bool = False, log_y: bool = False, ylim=None, hlines=(), vlines=()):
  """One line per ``(label, xs, ys)``; ``hlines`` / ``vlines``: ``(value, label)`` reference
  lines, dashed. Returns ``path``."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, xs, ys in lines:
    ax.plot(xs, ys, "o-" if len(xs) <= 24 else "-", label=label, markersize=4)
  for value, label in hlines:
    ax.axhline(value, color="k", ls="--", label=label)
  for value, label in vlines:
    ax.axvline(value, color="gray", ls=":", label=label)
  if log2_x:
    ax.set_xscale("log", base=2)
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def heatmap(path, values, *, rows: list, columns: list, xlabel: str, ylabel: str, title: str,
            value_label: str, vmin: float = 0.0, vmax: float = 100.0):
  """``values[i, j]`` for row ``rows[i]`` (top to bottom) and column ``columns[j]``, each cell
  written in. Returns ``path``."""
  values = np.asarray(values, float)
  if values.shape != (len(rows), len(columns)):
    raise ValueError(f"heatmap: values must have shape (rows, columns) = "
                     f"{(len(rows), len(columns))}, got {values.shape}")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 0.9 * len(columns)),
                                  max(3.0, 1.4 + 0.5 * len(rows))))
  image = ax.imshow(values, cmap="RdYlGn", vmin=vmin, vmax=vmax, aspect="auto")
  for (i, j), value in np.ndenumerate(values):
    ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(columns)), [str(c) for c in columns])
  ax.set_yticks(range(len(rows)), [str(r) for r in rows])
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  fig.colorbar(image, ax=ax, label=value_label)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
