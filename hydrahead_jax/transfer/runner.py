"""The three-stage transfer as one resumable command: teacher -> layout -> calibrated conversion -> stages.

    python train.py --config configs/transfer/smollm2_7to1.py [--set stages.distil.steps=200 ...] [--workdir DIR]
    python -m hydrahead_jax.transfer --config ...            # the same

Run directory (``workdir``)::

  transfer_config.json      the resolved config of the last start
  teacher_run/, teacher/    teacher.source='train': its training run (train.py machinery) and final model dir
  tokenizer/                the teacher's tokenizer as tokenizer.json (+ tokenizer_config.json), for the data
  selection/                layout.policy/budget: head_scores.json + layout_<policy>.json of the analysis
  layout.json               the head layout used
  converted/                the calibrated student (model dir; ``load_pretrained`` opens it)
  corpus/                   real text from installed packages (stages with data.source='corpus')
  stages/<name>/checkpoints the stage's train state (trainable params, optimizer, step, data position)
  stages/<name>/model       the model at the end of the stage (model dir)
  stages/<name>/stage_summary.json   written last: the stage is done
  eval/<model>.json         held-out probe / text scores per model
  metrics.jsonl, tb/, loss.png, summary.json, results.txt

Every step is cached: a rerun of the same command skips what is done and resumes the interrupted stage at its
newest checkpoint (same data position; on CPU the result is bitwise that of an uninterrupted run). Everything
that can be checked without computing is checked first (``preflight``): teacher, layout, patterns, lengths.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Iterable

from hydrahead_jax.transfer import config as tconfig
from hydrahead_jax.transfer.config import TransferConfig
from hydrahead_jax.transfer.context import Callback, Context, TransferInterrupted, save_json
from hydrahead_jax.transfer.prepare import (prepare_converted, prepare_corpus, prepare_eval, prepare_layout,
                                            prepare_teacher)
from hydrahead_jax.transfer.preflight import preflight
from hydrahead_jax.transfer.stage_loop import run_stage


# -- the run ---------------------------------------------------------------------------------------
def run(cfg: TransferConfig, callbacks: Iterable[Callback] = (), print_fn: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the whole transfer; returns the summary dict (``status``: complete | interrupted)."""
  from hydrahead_jax.train.loop import MetricsLog, SignalFlag

  t0 = time.time()
  pre = preflight(cfg)
  cfg = pre.cfg
  os.makedirs(cfg.workdir, exist_ok=True)
  save_json(os.path.join(cfg.workdir, "transfer_config.json"), tconfig.to_dict(cfg))
  ctx = Context(cfg, pre, print_fn, list(callbacks))
  ctx.log = MetricsLog(cfg.workdir, True)
  stage_summaries, status = [], "complete"
  try:
    with SignalFlag() as signals:
      ctx.signals = signals
      prepare_teacher(ctx)
      ctx.check_signal()
      prepare_layout(ctx)
      ctx.check_signal()
      prepare_converted(ctx)
      ctx.check_signal()
      prepare_corpus(ctx)
      prepare_eval(ctx)
      offset = 0
      for i, stage in enumerate(cfg.stages):
        ctx.check_signal()
        summary = run_stage(ctx, i, stage, offset)
        stage_summaries.append(summary)
        offset += stage.steps
  except TransferInterrupted as e:
    status = "interrupted"
    print_fn(f"{e}: stopped; rerun the same command to resume")
  finally:
    ctx.log.close()
  plot_stages(os.path.join(cfg.workdir, "metrics.jsonl"), os.path.join(cfg.workdir, "loss.png"),
              [s.name for s in cfg.stages])
  summary = {"status": status, "wall_s": time.time() - t0, "workdir": cfg.workdir, "stages": stage_summaries,
             "layout": ctx.layout.describe(pre.teacher_cfg.num_kv_heads) if ctx.layout else None,
             "converted": ctx.converted, "eval": ctx.evals}
  if status == "complete":
    final = stage_summaries[-1]["model"] if stage_summaries else ctx.converted
    summary["final_model"] = final
    text = format_report(ctx, stage_summaries)
    with open(ctx.path("results.txt"), "w") as f:
      f.write(text + "\n")
    print_fn(text)
  save_json(ctx.path("summary.json"), summary)
  return summary


# -- reporting -------------------------------------------------------------------------------------
def format_report(ctx: Context, stages: list[dict]) -> str:
  from hydrahead_jax.transfer.evaluate import format_table

  lines = ["transfer summary", f"  layout: {ctx.layout.describe(ctx.pre.teacher_cfg.num_kv_heads)}",
           f"  {'stage':<10}{'kind':<8}{'steps':>7}{'tokens':>13}{'wall s':>9}{'compile s':>11}{'tokens/s':>12}"
           f"{'final loss':>12}"]
  for s in stages:
    tps = s.get("tokens_per_s")
    lines.append(f"  {s['name']:<10}{s['kind']:<8}{s['steps']:>7}{s['tokens']:>13,}{s['wall_s']:>9.1f}"
                 f"{(s.get('compile_and_first_step_s') or 0):>11.1f}{'n/a' if tps is None else f'{tps:,.0f}':>12}"
                 f"{s['final_loss'] if s['final_loss'] is not None else float('nan'):>12.4f}")
  lines.append("  (wall s and tokens/s: this run's share when a stage was resumed or done earlier)")
  rows = [(k, v) for k, v in ctx.evals.items() if v]
  if rows:
    src = getattr(ctx, "eval_text_source", "")
    lines += ["", "held-out evaluation" + (f" (text: {src})" if src else ""), format_table(rows)]
  lines.append(f"final model: {stages[-1]['model'] if stages else ctx.converted}")
  return "\n".join(lines)


def plot_stages(metrics_path: str, out_png: str, stage_names) -> None:
  """One panel per stage: its loss (and KL / CE / answer accuracy where logged) against the global step."""
  try:
    import matplotlib
  except ImportError:
    return
  if not os.path.exists(metrics_path):
    return
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  with open(metrics_path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  stage_names = [n for n in stage_names if any(r.get("stage") == n for r in rows)]
  if not stage_names:
    return
  fig, axes = plt.subplots(1, len(stage_names), figsize=(4.5 * len(stage_names), 3.5), squeeze=False)
  for ax, name in zip(axes[0], stage_names):
    rs = [r for r in rows if r.get("stage") == name and isinstance(r.get("loss"), (int, float))]
    for key, color in (("loss", "tab:blue"), ("kl", "tab:green"), ("ce", "tab:red"), ("nmse_max", "tab:purple")):
      pts = [(r["step"], r[key]) for r in rs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
      if pts and (key == "loss" or any(p[1] != q[1] for p, q in zip(pts, [(0, r["loss"]) for r in rs]))):
        ax.plot(*zip(*pts), label=key, color=color)
    ax.set_title(f"stage {name}")
    ax.set_xlabel("global step")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
  axes[0][0].set_ylabel("loss")
  fig.tight_layout()
  fig.savefig(out_png, dpi=90)
  plt.close(fig)


# -- command line ----------------------------------------------------------------------------------
# On CPU, XLA's concurrency-optimized scheduler deadlocked (0 % CPU, forever; 2 of 2 tries at step 0, 0 of 4 with
# this flag) in the stage-1 program that runs the teacher's forward and the student's chunked Gated DeltaNet mixers in
# one jit (jax 0.10.2, 2 cores); the same parts in two jits, or the recurrent GDN, ran.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _gpu_plugin() -> bool:
  """Whether a CUDA plugin of jaxlib is installed (then the CPU-only flag is left out)."""
  import importlib.util

  for name in ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ImportError:
      pass
  return False


def apply_xla_flags(flags: str) -> None:
  """Appends ``flags`` (and, without a GPU plugin, the CPU scheduler work-around) to XLA_FLAGS; call it before the
  first JAX computation creates a backend."""
  if CPU_SCHEDULER_FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", "") + flags and not _gpu_plugin():
    flags += " " + CPU_SCHEDULER_FLAG
  if flags.strip():
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


def main_from_config(cfg: TransferConfig, print_config: bool = False) -> int:
  """``train.py`` / ``python -m hydrahead_jax.transfer``: runs a loaded transfer config (exit code)."""
  if print_config:
    print(tconfig.to_json(cfg))
    return 0
  apply_xla_flags(cfg.xla_flags)
  from hydrahead_jax.train.loop import TrainingDiverged

  try:
    run(cfg)
  except (TrainingDiverged, FloatingPointError) as e:  # diverged stage; non-finite conversion (nothing saved)
    print(f"error: {e}", file=sys.stderr)
    return 3
  return 0


def main_from_args(args) -> int:
  """``args`` with config, overrides, workdir, print_config."""
  return main_from_config(tconfig.load(args.config, args.overrides, args.workdir), getattr(args, "print_config", False))
