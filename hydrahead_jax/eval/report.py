"""Results on disk and on screen: ``results.json``, a task x length accuracy heatmap per model, perplexity by
token position (all models in one plot), and a printed table."""

from __future__ import annotations

import math
import os

from hydrahead_jax.interop import format as format_io


def length_label(n: int) -> str:
  """1024 -> '1K', 131072 -> '128K', 1500 -> '1500'."""
  return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def write_json(results: dict, out_dir: str) -> str:
  path = os.path.join(out_dir, "results.json")
  format_io.write_json(path, results)  # atomic: a run stopped mid-write keeps the previous results
  return path


def table(results: dict) -> str:
  """One row per (model, task): generation accuracy (mean answer-token log-prob) per length."""
  lengths = results["config"]["lengths"]
  head = ["model", "task"] + [length_label(n) for n in lengths]
  rows = []
  for name, m in results["models"].items():
    for task, cells in m["tasks"].items():
      row = [name, task]
      for n in lengths:
        c = cells.get(str(n))
        row.append("-" if c is None else f"{c['gen_acc']:.2f} ({c['logprob']:.2f})")
      rows.append(row)
    if m.get("ppl"):
      p = m["ppl"]
      rows.append([name, f"ppl@{length_label(p['length'])}"] + [
          f"{p['ppl']:.2f}" if i == 0 else "" for i in range(len(lengths))])
  widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
  fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
  lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
  return "\n".join(lines) + "\n(cells: generation accuracy (mean log-prob per answer token))"


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def heatmap(results: dict, out_dir: str) -> str | None:
  """accuracy_heatmap.png: per model, tasks x lengths, generation accuracy."""
  models = {k: m for k, m in results["models"].items() if m["tasks"]}
  if not models:
    return None
  plt = _plt()
  lengths = results["config"]["lengths"]
  fig, axes = plt.subplots(1, len(models), figsize=(1.2 + 1.1 * len(lengths) * len(models) + 1.5 * len(models),
                                                    0.9 + 0.5 * max(len(m["tasks"]) for m in models.values())),
                           squeeze=False)
  for ax, (name, m) in zip(axes[0], models.items()):
    tasks = list(m["tasks"])
    grid = [[m["tasks"][t].get(str(n), {}).get("gen_acc", math.nan) for n in lengths] for t in tasks]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
    ax.set_yticks(range(len(tasks)), tasks)
    for i, row in enumerate(grid):
      for j, v in enumerate(row):
        ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("context length (tokens)")
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="generation accuracy")
  path = os.path.join(out_dir, "accuracy_heatmap.png")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


def ppl_plot(results: dict, out_dir: str) -> str | None:
  """perplexity_by_position.png: perplexity per token-position bucket, one line per model."""
  models = {k: m for k, m in results["models"].items() if m.get("ppl")}
  if not models:
    return None
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for name, m in models.items():
    b = m["ppl"]["buckets"]
    ax.plot([(x["start"] + x["end"]) / 2 for x in b], [x["ppl"] for x in b], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("token position (bucket centre)")
  ax.set_ylabel("perplexity")
  ax.set_title("held-out text: perplexity by position", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  path = os.path.join(out_dir, "perplexity_by_position.png")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path
