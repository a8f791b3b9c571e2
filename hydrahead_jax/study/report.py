"""The study report: whatever arm results exist, merged into one markdown file with the verdicts, the tables and
two plots (retrieval accuracy vs length per arm; heatmap arm x length). Missing arms are listed as missing."""

from __future__ import annotations

import datetime
import glob
import math
import os

from hydrahead_jax.eval.report import length_label
from hydrahead_jax.study.arms import SCHEMA, read_result
from hydrahead_jax.study.config import StudyConfig
from hydrahead_jax.study.verdict import Judge, retrieval_score


def collect(out_dir: str, cfg: StudyConfig) -> tuple[dict[str, dict], list[str]]:
  """(arm id -> result, notes) of the result files in ``out_dir`` belonging to this study."""
  results, notes = {}, []
  ids = {a.id for a in cfg.arms}
  for path in sorted(glob.glob(os.path.join(out_dir, "arm*.json"))):
    r = read_result(path)
    if r.get("study") != cfg.name or r.get("arm") not in ids:
      notes.append(f"{path}: another study ({r.get('study')!r}, arm {r.get('arm')!r}); ignored")
      continue
    results[r["arm"]] = r
  return results, notes


def _acc_by_length(r: dict, tasks) -> dict[int, float]:
  cells = r.get("eval", {}).get("cells", {})
  lengths = sorted({int(L) for t in tasks for L in cells.get(t, {})})
  out = {}
  for L in lengths:
    s = retrieval_score(r, tasks, [L])
    if s is not None:
      out[L] = s.mean
  return out


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_lines(results, cfg: StudyConfig, window, path: str) -> str | None:
  tasks = cfg.eval.retrieval_tasks
  series = {a.id: (a, _acc_by_length(results[a.id], tasks)) for a in cfg.arms if a.id in results}
  series = {k: v for k, v in series.items() if v[1]}
  if not series:
    return None
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  for arm_id, (arm, acc) in series.items():
    xs = sorted(acc)
    teacher = arm.role == "teacher"
    ax.plot(xs, [acc[x] for x in xs], marker="o", label=f"{arm_id}: {arm.name}", lw=2.2 if teacher else 1.3,
            color="k" if teacher else None, ls="--" if arm.role == "random" else "-")
  if window:
    ax.axvline(window, color="k", ls="--", lw=0.8, alpha=0.6)
    ax.text(window, 1.02, " teacher window", fontsize=8, va="bottom")
  ax.set_xscale("log", base=2)
  xs = sorted({x for _, acc in series.values() for x in acc})
  ax.set_xticks(xs, [length_label(x) for x in xs])
  ax.set_ylim(-0.02, 1.08)
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel(f"retrieval accuracy (mean of {len(tasks)} tasks)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_heatmap(results, cfg: StudyConfig, path: str) -> str | None:
  tasks = cfg.eval.retrieval_tasks
  rows = [(a, _acc_by_length(results[a.id], tasks)) for a in cfg.arms if a.id in results]
  rows = [(a, acc) for a, acc in rows if acc]
  if not rows:
    return None
  lengths = sorted({L for _, acc in rows for L in acc})
  grid = [[acc.get(L, math.nan) for L in lengths] for _, acc in rows]
  plt = _plt()
  fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(lengths), 0.9 + 0.42 * len(rows)))
  im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths])
  ax.set_yticks(range(len(rows)), [f"{a.id}: {a.name}" for a, _ in rows], fontsize=8)
  for i, row in enumerate(grid):
    for j, v in enumerate(row):
      ax.text(j, i, "-" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xlabel("context length (tokens)")
  fig.colorbar(im, ax=ax, shrink=0.8, label="retrieval accuracy")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def _num(x, fmt=".3f", none="-") -> str:
  return none if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _si(n) -> str:
  if n is None:
    return "-"
  for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= div:
      return f"{n / div:.3g}{unit}"
  return str(n)


def _table(head, rows) -> list[str]:
  return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                        for r in rows]


def write_report(cfg: StudyConfig, out_dir: str, report_path: str) -> tuple[str, list]:
  """Writes the report and its two PNGs (into ``out_dir``); returns (report path, claims)."""
  results, notes = collect(out_dir, cfg)
  tasks = cfg.eval.retrieval_tasks
  roles: dict[str, list[str]] = {}
  for a in cfg.arms:
    roles.setdefault(a.role, []).append(a.id)
  window = next((r.get("teacher_window") for r in results.values() if r.get("teacher_window")), cfg.teacher_window)
  judge = Judge(results, roles, tasks, cfg.thresholds, window)
  claims = judge.all()
  os.makedirs(out_dir, exist_ok=True)
  rd = os.path.dirname(os.path.abspath(report_path))
  pngs = [plot_lines(results, cfg, window, os.path.join(out_dir, "accuracy_vs_length.png")),
          plot_heatmap(results, cfg, os.path.join(out_dir, "accuracy_heatmap.png"))]
  all_lengths = sorted({L for r in results.values() for L in _acc_by_length(r, tasks)})
  inside = [L for L in all_lengths if window is None or L <= window]
  beyond = [L for L in all_lengths if window is not None and L > window]
  t = cfg.thresholds
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  lines = [f"# Replication study: {cfg.name}", "",
           f"Generated {now} by `python -m hydrahead_jax.study --report` from the arm results in "
           f"`{os.path.relpath(out_dir, rd)}/` ({len(results)} of {len(cfg.arms)} arms). How to run and extend it, and "
           "what the results say in plain words: docs/study.md. Every number below is computed from those files; so "
           "are the verdicts.", "",
           "## Verdicts", ""]
  for c in claims:
    lines.append(f"{c.number}. **{c.text}: {c.verdict.upper()}.** {c.why}")
  lines += ["", f"Retrieval accuracy = mean generation accuracy over {', '.join(tasks)} (RULER string match); "
                f"inside the window = lengths <= {window or '(unknown)'}. Thresholds: equivalence margin "
                f"{t.margin:g} (claim 1), minimum gain {t.min_gain:g} (claims 2-4), floor {t.floor:g}, "
                f"intervals +-{t.z:g} SE (docs/study.md).", ""]
  missing = [a for a in cfg.arms if a.id not in results]
  if missing:
    lines += ["## Missing arms", ""]
    lines += [f"- arm {a.id} ({a.name}): missing - no `arm{a.id}.json` in `{os.path.relpath(out_dir, rd)}/` "
              f"(not run or imported yet){'; ' + a.note if a.note else ''}" for a in missing]
    lines.append("")
  lines += ["## Results", ""]
  head = (["arm", "name", "layout", "FA groups", "params", "cache B/token", "train tokens", "train tok/s",
           "retrieval in window", "retrieval beyond"] + [length_label(L) for L in all_lengths]
          + ["top-1 agree", "KL", "n/cell", "source"])
  rows = []
  for a in cfg.arms:
    r = results.get(a.id)
    if r is None:
      rows.append([a.id, a.name, "missing"] + ["-"] * (len(head) - 3))
      continue
    c, tr, p = r.get("cost", {}), r.get("transfer") or {}, r.get("proxy") or {}
    acc = _acc_by_length(r, tasks)
    sin = retrieval_score(r, tasks, [L for L in inside if L in acc]) if inside else None
    sbe = retrieval_score(r, tasks, [L for L in beyond if L in acc]) if beyond else None
    ns = sorted({cell["n"] for per in r["eval"]["cells"].values() for cell in per.values()})
    rows.append([a.id, a.name, c.get("layout", "-"), f"{c.get('fa_groups')}/{c.get('total_groups')}",
                 _si(c.get("params")), _si(c.get("cache_bytes_per_token")), _si(tr.get("tokens")),
                 _num(tr.get("tokens_per_s"), ",.0f"), _num(sin.mean if sin else None),
                 _num(sbe.mean if sbe else None)] + [_num(acc.get(L), ".2f") for L in all_lengths]
                + [_num(p.get("top1_agreement")), _num(p.get("kl"), ".4f"), "/".join(map(str, ns)), r["source"]])
  lines += _table(head, rows)
  lines += ["", "Cache B/token: FA K/V bytes per token and sequence (`generation.cache_bytes`); LA state is "
                f"fixed-size. Top-1 agree / KL: short-context proxy vs the teacher on {cfg.eval.proxy_docs} "
                f"held-out documents of {cfg.eval.proxy_length} tokens ('-': not measured, e.g. an imported arm).", ""]
  for png, title in zip(pngs, ("Retrieval accuracy vs length", "Retrieval accuracy, arm x length")):
    if png:
      lines += [f"![{title}]({os.path.relpath(png, rd)})", ""]
  lines += ["## Per task", ""]
  rows = []
  for a in cfg.arms:
    r = results.get(a.id)
    if r:
      for task, per in r["eval"]["cells"].items():
        rows.append([a.id, task] + [_num(per.get(str(L), {}).get("acc"), ".2f") for L in all_lengths])
  lines += _table(["arm", "task"] + [length_label(L) for L in all_lengths], rows) + [""]
  ppl = {a.id: results[a.id]["eval"].get("ppl") for a in cfg.arms if a.id in results
         and results[a.id]["eval"].get("ppl")}
  if ppl:
    buckets = max((p["buckets"] for p in ppl.values()), key=len)
    lines += ["## Perplexity by token position (held-out text)", ""]
    lines += _table(["arm"] + [f"{length_label(b['start']) if b['start'] else 0}-{length_label(b['end'])}"
                               for b in buckets],
                    [[k] + [_num(b["ppl"], ".2f") for b in p["buckets"]] for k, p in ppl.items()]) + [""]
  lines += ["## Budget per arm", ""]
  rows = []
  for a in cfg.arms:
    r = results.get(a.id)
    if r:
      b, e = r.get("budget", {}), r.get("env", {})
      stages = ", ".join(f"{k} {_si(v)}" for k, v in b.get("train_tokens_per_stage", {}).items()) or "-"
      rows.append([a.id, b.get("name", "-"), stages, _num(b.get("transfer_minutes"), ".1f"),
                   _num(b.get("eval_minutes"), ".1f"), _num(b.get("target_minutes_per_arm"), ".0f"),
                   e.get("device", "-"), e.get("date", "-"), r.get("budget_note", "")])
  lines += _table(["arm", "budget", "train tokens per stage", "transfer min", "eval min", "target min", "device",
                   "date", "note"], rows)
  lines += ["", "Minutes are accumulated over every command that worked on the arm (GPU stretches); imported arms "
                "record the evaluation's own seconds only."]
  if notes:
    lines += ["", "Notes:"] + [f"- {n}" for n in notes]
  os.makedirs(rd, exist_ok=True)
  with open(report_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return report_path, claims


__all__ = ["SCHEMA", "collect", "write_report"]
