"""One transfer stage: skipped when done (its record checked), else resumed from its newest intact checkpoint (a
damaged one is set aside) or started from the previous stage's model; trained with the jitted steps of
``transfer.stages``, checkpointed, and written as a model directory plus ``stage_summary.json`` (last: the stage is
done)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from typing import Any, Mapping

import numpy as np

from hydrahead_jax.config import ModelConfig
from hydrahead_jax.interop.format import read_json
from hydrahead_jax.transfer import config as tconfig
from hydrahead_jax.transfer.config import StageConfig, TransferConfigError
from hydrahead_jax.transfer.context import (Context, TransferInterrupted, cached_eval, json_default, save_json,
                                            stage_data)


STAGE_RESUME_SAFE = ("steps", "log_every", "checkpoint_every", "data.num_workers", "data.read_threads",
                     "data.prefetch_buffer")


def _stage_record(ctx: Context, i: int, stage: StageConfig, dcfg, scfg: ModelConfig, init_dir: str) -> dict:
  d = tconfig.to_dict(dataclasses.replace(stage, data=dcfg))
  return {"stage": d, "index": i, "student": scfg.to_dict(), "init": os.path.relpath(init_dir, ctx.workdir),
          "teacher": {"source": ctx.cfg.teacher.source, "dtype": ctx.cfg.teacher.dtype,
                      "compute_dtype": ctx.cfg.teacher.compute_dtype}}


def _check_record(where: str, old: Mapping, new: Mapping) -> None:
  a, b = tconfig.flat(json.loads(json.dumps(old))), tconfig.flat(json.loads(json.dumps(new, default=json_default)))
  bad = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
         and not any(k == f"stage.{s}" for s in STAGE_RESUME_SAFE)]
  if bad:
    keys = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in bad[:3])
    raise TransferConfigError(f"{where} was made with another config ({keys}{'; ...' if len(bad) > 3 else ''}); "
                              "refusing to mix them. Use another --workdir (or delete that stage directory)")


def _stage_model_cfg(base: ModelConfig, stage: StageConfig) -> ModelConfig:
  kw = {}
  if stage.rope == "raise_base":
    kw["rope_theta"] = float(stage.rope_theta)
  if stage.remat is not None:
    kw["remat"] = stage.remat
  if stage.kind == "long":
    kw["max_position"] = max(base.max_position if base.max_position else 0, stage.data.seq_len)
  return base.replace(**kw) if kw else base


def run_stage(ctx: Context, i: int, stage: StageConfig, offset: int) -> dict:
  """Runs (or resumes, or skips when done) stage ``i``; returns its summary."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from hydrahead_jax.data.pipeline import make_train_iterator
  from hydrahead_jax.interop.orbax import load_orbax, save_pretrained
  from hydrahead_jax.nn.model import abstract_model
  from hydrahead_jax.train.checkpoint import Checkpointer, DamagedCheckpoint, abstract_like
  from hydrahead_jax.train.loop import StepWindow
  from hydrahead_jax.train.state import flatten_state, leaf_names, merge
  from hydrahead_jax.train.step import BATCH_KEYS
  from hydrahead_jax.transfer import stages as S

  cfg, pf = ctx.cfg, ctx.print_fn
  sdir = ctx.path("stages", stage.name)
  model_dir = os.path.join(sdir, "model")
  done_file = os.path.join(sdir, "stage_summary.json")
  init_dir = ctx.converted if i == 0 else ctx.path("stages", cfg.stages[i - 1].name, "model")
  base_cfg, base_model = load_orbax(init_dir)
  scfg = _stage_model_cfg(base_cfg, stage)
  dcfg = stage_data(ctx, stage)
  record = _stage_record(ctx, i, stage, dcfg, scfg, init_dir)
  if os.path.isfile(done_file):
    done = read_json(done_file)
    _check_record(f"stage {stage.name!r} ({sdir})", done["record"], record)
    pf(f"stage {i + 1}/{len(cfg.stages)} {stage.name!r}: done ({done['steps']} steps, {done['tokens']:,} tokens); "
       f"model {model_dir}")
    ctx.evals[f"after {stage.name}"] = done.get("eval")
    return done

  graphdef, _, rest = nnx.split(abstract_model(scfg), nnx.Param, ...)
  params = flatten_state(nnx.state(base_model, nnx.Param))
  del base_model
  names = leaf_names(scfg, params)
  plan = S.make_plan(stage, names)
  shapes = {k: tuple(v.shape) for k, v in params.items()}
  tx, sched = S.make_optimizer(stage, plan)
  train_p = {k: params[k] for k in plan.union}
  frozen = {k: v for k, v in params.items() if k not in plan.union}
  # committed to the device like the step's outputs (else the second step compiles again)
  dev = jax.devices()[0]
  state = jax.device_put({"params": train_p, "opt_state": jax.jit(tx.init)(train_p),
                          "step": jnp.zeros((), jnp.int32)}, dev)
  frozen = jax.device_put(frozen, dev)
  t_graphdef, t_state, t_rest = nnx.split(ctx.teacher, nnx.Param, ...)
  t_params = jax.device_put(flatten_state(t_state), dev)
  data_iter = make_train_iterator(dcfg)
  ckpt = Checkpointer(sdir, dataclasses.replace(cfg.checkpoint, every=stage.checkpoint_every), pf)
  total, tps = stage.steps, stage.tokens_per_step
  start = 0
  try:
    while (latest := ckpt.latest_step()) is not None:
      try:
        _check_record(f"stage {stage.name!r} checkpoint {latest} ({sdir})", ckpt.read_config(latest), record)
        state = ckpt.restore(latest, abstract_like(state), data_iter)
        start = latest
        break
      except DamagedCheckpoint as e:
        ckpt.handle_damaged(e)
    ctx.log.truncate_after(offset + start)
    n_total = sum(int(np.prod(s)) for s in shapes.values())
    desc = "; ".join(f"from step {st}: {plan.num_trainable(p, shapes):,}" for p, st in enumerate(plan.starts))
    pf(f"stage {i + 1}/{len(cfg.stages)} {stage.name!r} ({stage.kind}): {total} steps x {dcfg.batch_size} x "
       f"{dcfg.seq_len} = {total * tps:,} tokens; trainable of {n_total:,} parameters: {desc}; "
       + (f"resuming at step {start}" if start else f"from {init_dir}"))
    if stage.rope != "keep" or scfg.rope_theta != base_cfg.rope_theta:
      pf(f"  FA heads' RoPE: {stage.rope} (rope_theta {base_cfg.rope_theta:g} -> {scfg.rope_theta:g})")

    fns: dict[int, Any] = {}

    def step_fn(phase: int):
      if phase not in fns:
        fns[phase] = jax.jit(S.make_step(stage, plan, phase, graphdef, rest, t_graphdef, t_rest, tx, sched,
                                         remat_align=scfg.remat != "none"), donate_argnums=(0,))
      return fns[phase]

    window = StepWindow(tps, max(10, stage.log_every))
    t_stage = time.time()
    last_saved = start if start else None
    pbar = None
    if cfg.progress:
      from tqdm.auto import tqdm

      pbar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True, mininterval=0.5,
                  file=sys.stderr)

    def flush():
      if not window.pending:
        return
      rows, tok_s, _, _ = window.drain(
          lambda m: S.host_metrics(stage, m), last_saved,
          lambda s, m, ph: ctx.log.write({"step": offset + s, "stage": stage.name, "stage_step": s, **m}))
      now = time.time()
      for s, m, ph in rows:
        if s % stage.log_every == 0 or s == rows[-1][0]:
          row = {"step": offset + s, "stage": stage.name, "stage_index": i, "stage_step": s, "phase": ph,
                 "tokens_per_s": tok_s, "time": now - t_stage, **{k: v for k, v in m.items() if k != "ok"}}
          ctx.log.write(row)
      s, m, ph = rows[-1]
      if pbar is not None:
        pbar.update(len(rows))
        pbar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
      elif s % stage.log_every == 0 or s == total:
        extra = " ".join(f"{k} {m[k]:.4f}" for k in ("kl", "ce", "nmse_max", "answer_acc") if k in m)
        pf(f"  [{stage.name}] step {s}/{total} loss {m['loss']:.4f} {extra} grad_norm {m['grad_norm']:.3f} "
           f"lr {m['lr']:.2e} tok/s {tok_s:,.0f}")

    def save(step: int):
      nonlocal last_saved
      if ckpt.save(step, state, data_iter, record):
        last_saved = step
        for cb in ctx.callbacks:
          cb("checkpoint", stage.name, step, _Hook(ctx, ckpt, stage, step))

    step = start
    first = True
    while step < total and ctx.signals.received is None:
      phase = plan.phase_at(step)
      local = next(data_iter)
      batch = jax.device_put({k: np.asarray(local[k]) for k in BATCH_KEYS}, dev)
      state, metrics = step_fn(phase)(state, frozen, t_params, batch)
      step += 1
      window.add(step, metrics, phase)
      flush_now = False
      if first:
        jax.block_until_ready(metrics)
        window.first_step_done()
        first = False
        flush_now = True
      interrupted = ctx.signals.received is not None
      do_save = step % stage.checkpoint_every == 0 or step == total or interrupted
      if flush_now or do_save or step % stage.log_every == 0:
        flush()
      if do_save:
        save(step)
      for cb in ctx.callbacks:
        cb("step", stage.name, step, _Hook(ctx, ckpt, stage, step))
    flush()
    if pbar is not None:
      pbar.close()
    if last_saved != step:
      save(step)
    ckpt.wait()
    if ctx.signals.received is not None and step < total:
      raise TransferInterrupted(f"received {signal.Signals(ctx.signals.received).name} in stage {stage.name!r}: "
                                f"saved checkpoint at step {step}")
    wall = time.time() - t_stage
    # the stage's model: a normal model directory
    model = merge(graphdef, {**frozen, **state["params"]}, rest)
    tmp = model_dir + ".partial"
    save_pretrained(model, tmp, overwrite=True, metadata={
        "transfer_stage": stage.name, "stage_index": i, "kind": stage.kind, "steps": total,
        "tokens": total * tps, "rope": {"mode": stage.rope, "rope_theta": scfg.rope_theta,
                                        "teacher_rope_theta": ctx.pre.teacher_cfg.rope_theta,
                                        "teacher_window": stage.teacher_window or ctx.pre.window},
        "init": init_dir, "tokenizer": ctx.tokenizer_path})
    if os.path.isdir(model_dir):
      shutil.rmtree(model_dir)
    os.replace(tmp, model_dir)
    new_tokens = (total - start) * tps
    summary = {
        "name": stage.name, "kind": stage.kind, "index": i, "steps": total, "tokens": total * tps,
        "resumed_at": start, "seq_len": dcfg.seq_len, "batch_size": dcfg.batch_size,
        "final_loss": float(np.mean(window.recent)) if window.recent else None,
        "wall_s": wall, "tokens_this_run": new_tokens,
        "compile_and_first_step_s": window.first_s,
        "tokens_per_s": window.tokens_per_s,
        "model": model_dir, "record": record,
    }
    if cfg.eval.enabled:
      summary["eval"] = cached_eval(ctx, f"after_{stage.name}", lambda: model)
      ctx.evals[f"after {stage.name}"] = summary["eval"]
    save_json(done_file, summary)
    tok_s = summary["tokens_per_s"]
    pf(f"stage {i + 1}/{len(cfg.stages)} {stage.name!r} done: {total * tps:,} tokens ({new_tokens:,} this run) in "
       f"{wall:.1f} s wall (compile + first step {window.first_s or 0:.1f} s), "
       f"{'n/a' if tok_s is None else f'{tok_s:,.0f}'} tokens/s; final loss "
       f"{'n/a' if summary['final_loss'] is None else format(summary['final_loss'], '.4f')} -> {model_dir}")
    for cb in ctx.callbacks:
      cb("stage_end", stage.name, total, _Hook(ctx, ckpt, stage, total))
    return summary
  finally:
    ckpt.close()


@dataclasses.dataclass
class _Hook:
  """What callbacks see."""

  ctx: Context
  checkpointer: Any
  stage: StageConfig
  step: int
