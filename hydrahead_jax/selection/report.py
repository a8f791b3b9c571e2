"""What a user looks at: ``head_scores.json``, a score heatmap (layers x heads, FA picks marked), the CKA
matrix and a short text report."""

from __future__ import annotations

import math

import numpy as np

from hydrahead_jax.config import HeadLayout
from hydrahead_jax.interop import format as format_io
from hydrahead_jax.interop.format import read_json


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    v = float(x)
    return None if not math.isfinite(v) else round(v, 6)
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def write_json(path: str, data: dict) -> None:
  """``data`` with numpy values made plain (non-finite floats as null), written atomically."""
  format_io.write_json(path, _jsonable(data))


def read_scores(path: str) -> dict:
  data = read_json(path, ValueError, "scores file")
  if "scores" not in data or "selection_score" not in data:
    raise ValueError(f"scores file {path}: missing 'scores'/'selection_score' (not written by the selection CLI?)")
  return data


def grid(data: dict, name: str) -> np.ndarray:
  return np.asarray([[np.nan if v is None else v for v in row] for row in data["scores"][name]], np.float64)


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def heatmap(path: str, scores_LxH: np.ndarray, *, heads_per_group: int, layout: HeadLayout | None = None,
            title: str = "causal patching score") -> None:
  """Layers (rows) x query heads (columns); FA picks of ``layout`` outlined; group boundaries drawn."""
  plt = _plt()
  L, H = scores_LxH.shape
  fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * H + 2.5), max(3.0, 0.28 * L + 1.5)))
  vmax = np.nanmax(np.abs(scores_LxH)) if np.isfinite(scores_LxH).any() else 1.0
  im = ax.imshow(scores_LxH, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  for g in range(1, H // heads_per_group):
    ax.axvline(g * heads_per_group - 0.5, color="k", lw=0.6, alpha=0.5)
  if layout is not None:
    for l, groups in enumerate(layout.fa_groups):
      for g in groups:
        ax.add_patch(plt.Rectangle((g * heads_per_group - 0.5, l - 0.5), heads_per_group, 1, fill=False,
                                   edgecolor="lime", lw=2.0))
  ax.set_xlabel(f"query head (groups of {heads_per_group}; green boxes: FA groups)")
  ax.set_ylabel("layer")
  ax.set_xticks(range(H))
  ax.set_yticks(range(0, L, max(1, L // 15)))
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def cka_plot(path: str, cka_LxL: np.ndarray, title: str = "linear CKA of attention outputs") -> None:
  plt = _plt()
  L = cka_LxL.shape[0]
  fig, ax = plt.subplots(figsize=(5.5, 4.8))
  im = ax.imshow(cka_LxL, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  ax.set_xlabel("layer")
  ax.set_ylabel("layer")
  ticks = range(0, L, max(1, L // 10))
  ax.set_xticks(ticks)
  ax.set_yticks(ticks)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def top_heads(scores_LxH: np.ndarray, k: int) -> list[tuple[int, int, float]]:
  flat = np.nan_to_num(scores_LxH, nan=-np.inf).ravel()
  H = scores_LxH.shape[1]
  return [(int(i // H), int(i % H), float(scores_LxH.ravel()[i])) for i in np.argsort(-flat, kind="stable")[:k]]


def text_report(data: dict) -> str:
  """A short human summary of a ``head_scores.json`` dict."""
  lines = []
  m = data.get("model", {})
  lines.append(f"model: {m.get('name', '?')} - {m.get('num_layers')} layers x {m.get('num_heads')} heads "
               f"({m.get('num_kv_heads')} KV groups)")
  for p in data.get("probes", []):
    lines.append(f"probes @ {p['length']} tokens: {p['num']} ({', '.join(p['tasks'])}); kept {p['kept']} with "
                 f"m_clean - m_corrupt >= {p['min_delta']}; clean accuracy {p['clean_accuracy']:.2f}, "
                 f"corrupt accuracy {p['corrupt_accuracy']:.2f}")
  sel = np.asarray([[np.nan if v is None else v for v in row] for row in data["selection_score"]])
  lines.append(f"selection score: {data.get('selection_score_name', 'exact')}")
  lines.append("top heads (layer, head, score): " + ", ".join(f"L{l}H{h} {s:.3f}" for l, h, s in top_heads(sel, 10)))
  if data.get("agreement"):
    lines.append(f"agreement with {data.get('selection_score_name', 'exact')} patching:")
    for name, a in data["agreement"].items():
      lines.append("  " + name + ": " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a"
                                                   for k, v in a.items()))
  if data.get("blocks"):
    lines.append(f"CKA blocks (consecutive layers with CKA >= 0.5 to the block's first): {data['blocks']}")
  cts = data.get("causal_test") or []
  for ct in [cts] if isinstance(cts, dict) else cts:
    at = f" @ {ct['length']} tokens" if "length" in ct else ""
    lines.append(f"causal test{at} ({ct['num_probes']} held-out probes, {ct['k']} heads = 1/8 of "
                 f"{ct['total_heads']}, mean-ablated):")
    lines.append(f"  no ablation: accuracy {ct['baseline_accuracy']:.3f}")
    lines.append(f"  top-{ct['k']} heads: accuracy {ct['top_accuracy']:.3f}")
    lines.append(f"  {ct['k']} random heads ({ct['random_draws']} draws): accuracy {ct['random_accuracy_mean']:.3f} "
                 f"(min {ct['random_accuracy_min']:.3f}, max {ct['random_accuracy_max']:.3f})")
  for name, lay in data.get("layouts", {}).items():
    lines.append(f"layout {name}: {lay['describe']}; {lay['rounding']}; {lay['selection']}")
  t = data.get("timing", {})
  if t:
    lines.append("timing (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if isinstance(v, (int, float))))
    if "device" in t:
      lines.append(f"device: {t['device']}")
  return "\n".join(lines) + "\n"
