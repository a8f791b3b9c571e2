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

import collections
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from hydrahead_jax.config import HeadLayout, ModelConfig
from hydrahead_jax.transfer import config as tconfig
from hydrahead_jax.transfer.config import StageConfig, TransferConfig, TransferConfigError
from hydrahead_jax.interop.format import read_json, write_json
from hydrahead_jax.transfer.preflight import Preflight, check_prepared, preflight, student_cfg

Callback = Callable[[str, str, int, Any], None]  # (event: 'step' | 'checkpoint' | 'stage_end', stage, step, ctx)


class TransferInterrupted(Exception):
  """SIGTERM/SIGINT: the current stage saved a checkpoint; rerun the same command to resume."""


def _write(path: str, data: Any) -> None:
  write_json(path, data, default=_json_default)


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# -- the run ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Context:
  cfg: TransferConfig
  pre: Preflight
  print_fn: Callable[[str], None]
  callbacks: list
  log: Any = None
  signals: Any = None
  teacher: Any = None  # the stages' teacher (teacher.dtype parameters)
  teacher_f32: Any = None  # float32 parameters: selection and conversion
  tokenizer: Any = None
  tokenizer_path: str | None = None
  layout: HeadLayout | None = None
  converted: str | None = None
  corpus: str | None = None
  eval_sets: list = dataclasses.field(default_factory=list)
  eval_text: list = dataclasses.field(default_factory=list)
  evals: dict = dataclasses.field(default_factory=dict)
  eval_text_source: str = ""

  @property
  def workdir(self) -> str:
    """The run directory, absolute (Orbax refuses relative checkpoint paths; the default workdir is relative)."""
    return os.path.abspath(self.cfg.workdir)

  def path(self, *parts) -> str:
    return os.path.join(self.workdir, *parts)

  def check_signal(self) -> None:
    if self.signals is not None and self.signals.received is not None:
      raise TransferInterrupted(f"received {signal.Signals(self.signals.received).name}")


def run(cfg: TransferConfig, callbacks: Iterable[Callback] = (), print_fn: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the whole transfer; returns the summary dict (``status``: complete | interrupted)."""
  from hydrahead_jax.train.loop import MetricsLog, SignalFlag

  t0 = time.time()
  pre = preflight(cfg)
  cfg = pre.cfg
  os.makedirs(cfg.workdir, exist_ok=True)
  _write(os.path.join(cfg.workdir, "transfer_config.json"), tconfig.to_dict(cfg))
  ctx = Context(cfg, pre, print_fn, list(callbacks))
  ctx.log = MetricsLog(cfg.workdir, True)
  stage_summaries, status = [], "complete"
  try:
    with SignalFlag() as signals:
      ctx.signals = signals
      _prepare_teacher(ctx)
      ctx.check_signal()
      _prepare_layout(ctx)
      ctx.check_signal()
      _prepare_converted(ctx)
      ctx.check_signal()
      _prepare_corpus(ctx)
      _prepare_eval(ctx)
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
  _write(ctx.path("summary.json"), summary)
  return summary


# -- teacher, layout, conversion, corpus -------------------------------------------------------------
def _train_teacher(ctx: Context) -> str:
  """teacher.source='train': trains (or resumes) the teacher with the train.py loop; returns its model dir."""
  return train_teacher(ctx.cfg.teacher, ctx.workdir, ctx.print_fn)


def train_teacher(t: tconfig.TeacherConfig, workdir: str, print_fn: Callable[[str], None] = print) -> str:
  """Trains (or resumes; cached once done) the teacher of ``t.train_config`` in ``<workdir>/teacher_run`` with the
  train.py loop; returns its model dir ``<workdir>/teacher``. Also used by ``hydrahead_jax.study`` (one teacher for
  every arm)."""
  from hydrahead_jax.interop.orbax import MANIFEST

  workdir = os.path.abspath(workdir)
  model_dir = os.path.join(workdir, "teacher")
  if os.path.isfile(os.path.join(model_dir, MANIFEST)):
    return model_dir
  import orbax.checkpoint as ocp
  from flax import nnx

  from hydrahead_jax.interop.orbax import save_pretrained
  from hydrahead_jax.nn.model import abstract_model
  from hydrahead_jax.train import config_lib
  from hydrahead_jax.train.loop import train
  from hydrahead_jax.train.state import merge

  run_dir = os.path.join(workdir, "teacher_run")
  tcfg = config_lib.load(t.train_config, t.train_overrides, workdir=run_dir)
  print_fn(f"teacher: training {t.train_config} in {run_dir} (train.py machinery; cached once done)")
  summary = train(tcfg, print_fn=print_fn)
  if summary["status"] != "complete":
    raise TransferInterrupted("teacher training was interrupted")
  with ocp.CheckpointManager(os.path.join(run_dir, "checkpoints")) as m:
    step = m.latest_step()
    state = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  graphdef, _, rest = nnx.split(abstract_model(tcfg.model), nnx.Param, ...)
  model = merge(graphdef, {k: np.asarray(v) for k, v in state["params"].items()}, rest)
  tmp = model_dir + ".partial"
  save_pretrained(model, tmp, overwrite=True, metadata={
      "trained_by": "hydrahead_jax.transfer (teacher.source='train')", "train_config": t.train_config,
      "step": int(step), "retrieval_acc": summary.get("retrieval_acc"), "final_loss": summary.get("final_loss")})
  os.replace(tmp, model_dir)
  return model_dir


def _save_tokenizer(ctx: Context, tok) -> str | None:
  from hydrahead_jax.data.tokenizer import ByteTokenizer, HFTokenizer

  if isinstance(tok, ByteTokenizer):
    return None
  if isinstance(tok, HFTokenizer):
    return tok.path
  d = ctx.path("tokenizer")
  path = os.path.join(d, "tokenizer.json")
  if not os.path.isfile(path):
    os.makedirs(d, exist_ok=True)
    tok.save(path + ".tmp")
    backend = tok.backend
    names = {k: backend.id_to_token(v) for k, v in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id),
                                                   ("pad_token", tok.pad_id)) if v is not None}
    _write(os.path.join(d, "tokenizer_config.json"), names)
    os.replace(path + ".tmp", path)
  from hydrahead_jax.data.tokenizer import load_tokenizer

  back = load_tokenizer(path)
  if (back.vocab_size, back.bos_id, back.eos_id, back.pad_id) != (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id):
    raise RuntimeError(f"{path}: the saved tokenizer does not reproduce the teacher's special tokens")
  return path


def _prepare_teacher(ctx: Context) -> None:
  from hydrahead_jax.interop.load import load

  t = ctx.cfg.teacher
  source = _train_teacher(ctx) if t.source == "train" else t.source
  t0 = time.time()
  compute = t.compute_dtype or t.dtype
  tcfg, model, tok = load(source, dtype="float32", compute_dtype=compute, tokenizer=t.tokenizer or True,
                          progress=ctx.cfg.progress, **dict(t.model_overrides))
  ctx.teacher_f32 = model
  ctx.tokenizer = tok
  ctx.tokenizer_path = _save_tokenizer(ctx, tok)
  ctx.teacher = _cast_model(model, t.dtype)
  ctx.print_fn(f"teacher: {source} ({tcfg.num_layers} layers x {tcfg.num_heads} heads, {tcfg.num_kv_heads} KV "
               f"groups, window {ctx.pre.window}; {model.num_params():,} parameters, stages run it in {t.dtype}) "
               f"loaded in {time.time() - t0:.1f} s")


def _cast_model(model, dtype: str):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  if model.cfg.param_dtype == dtype:
    return model
  cfg = model.cfg.replace(param_dtype=dtype)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  from hydrahead_jax.nn.model import abstract_model

  gd, _, rest2 = nnx.split(abstract_model(cfg), nnx.Param, ...)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params.to_pure_dict())
  return nnx.merge(gd, params, rest2)


def _prepare_layout(ctx: Context) -> None:
  from hydrahead_jax.selection import policies

  cfg, tcfg = ctx.cfg, ctx.pre.teacher_cfg
  used = ctx.path("layout.json")
  if ctx.pre.layout is not None:
    layout, info = ctx.pre.layout, {"policy": "file", "file": os.path.abspath(cfg.layout.file)}
  else:
    lc = cfg.layout
    sel = ctx.path("selection")
    file = os.path.join(sel, f"layout_{lc.policy}.json")
    if os.path.isfile(file):
      layout, info = policies.read_layout(file), {"policy": lc.policy, "file": file, "cached": True}
    else:
      from hydrahead_jax.selection import report
      from hydrahead_jax.selection.analysis import AnalysisConfig, analyze
      from hydrahead_jax.selection.probes import make_probes

      t0 = time.time()
      ctx.print_fn(f"selection: scoring {tcfg.num_layers * tcfg.num_heads} heads ({', '.join(lc.methods)}) on "
                   f"probes of {list(lc.lengths)} tokens, then policy {lc.policy!r} at budget {lc.budget}")
      sets = [make_probes(ctx.tokenizer, L, tasks=lc.tasks, per_task=lc.per_task, seed=lc.seed) for L in lc.lengths]
      acfg = AnalysisConfig(batch_size=lc.batch_size, chunk=lc.chunk, methods=tuple(lc.methods), seed=lc.seed,
                            progress=cfg.progress)
      data = analyze(ctx.teacher_f32, sets, acfg, name=cfg.teacher.source)
      layout, info = policies.make_layout(lc.policy, data["selection_score"], lc.budget,
                                          num_groups=tcfg.num_kv_heads, heads_per_group=tcfg.heads_per_group,
                                          seed=lc.seed)
      os.makedirs(sel, exist_ok=True)
      data["budget"] = lc.budget
      report.write_json(os.path.join(sel, "head_scores.json"), data)
      policies.write_layout(file + ".tmp", layout, info)
      os.replace(file + ".tmp", file)
      ctx.print_fn(f"selection: {info['describe']} ({info['rounding']}) in {time.time() - t0:.1f} s -> {file}")
  if os.path.isfile(used):
    old = HeadLayout.from_json(open(used).read())
    if old != layout:
      raise TransferConfigError(f"run directory {ctx.workdir!r} was started with another head layout "
                                f"({used}); use another --workdir for a new layout")
  else:
    policies.write_layout(used, layout, info)
  ctx.layout = layout
  ctx.print_fn(f"layout: {layout.describe(tcfg.num_kv_heads)}")


def _prepare_converted(ctx: Context) -> None:
  from hydrahead_jax.interop.orbax import MANIFEST, read_manifest, save_pretrained
  from hydrahead_jax.transfer.convert import calibration_batches, convert_teacher

  cfg = ctx.cfg
  out = ctx.path("converted")
  ctx.converted = out
  scfg = student_cfg(cfg, ctx.pre.teacher_cfg, ctx.layout)
  record = {"layout": [list(x) for x in ctx.layout.fa_groups], "convert": tconfig.to_dict(cfg.convert),
            "student": scfg.to_dict()}
  if os.path.isfile(os.path.join(out, MANIFEST)):
    old = read_manifest(out).get("metadata", {}).get("transfer")
    if old is not None and json.loads(json.dumps(old)) != json.loads(json.dumps(record, default=_json_default)):
      diff = sorted(k for k in set(tconfig.flat(old)) | set(tconfig.flat(record))
                    if tconfig.flat(old).get(k) != tconfig.flat(json.loads(json.dumps(record))).get(k))
      raise TransferConfigError(f"{out} was converted with another layout/convert config ({', '.join(diff[:4])}); "
                                "use another --workdir")
    return
  c = cfg.convert
  t0 = time.time()
  calib = held = None
  if c.calib_num > 0:
    calib = calibration_batches(ctx.tokenizer, num=c.calib_num, length=c.calib_length, batch_size=c.calib_batch,
                                seed=c.seed)
    if c.heldout_num >= c.calib_batch:
      held = calibration_batches(ctx.tokenizer, num=c.heldout_num, length=c.calib_length,
                                 batch_size=c.calib_batch, seed=c.seed + 1)
  overrides = {k: v for k, v in scfg.to_dict().items() if getattr(ctx.pre.teacher_cfg, k) != getattr(scfg, k)
               and k != "layout"}
  student, rep = convert_teacher(ctx.teacher_f32, ctx.layout, calib, heldout=held, inputs=c.inputs,
                                 iterations=c.iterations, free_running_check=False, progress=cfg.progress, **overrides)
  rep["seconds"] = time.time() - t0
  from hydrahead_jax.selection.report import _jsonable

  tmp = out + ".partial"
  save_pretrained(student, tmp, overwrite=True, metadata={"conversion": _jsonable(rep), "transfer": record,
                                                          "tokenizer": ctx.tokenizer_path})
  os.replace(tmp, out)
  h = rep.get("heldout")
  extra = (f"; held-out LA head RMS vs teacher: max deviation {h['max_head_rms_dev']:.1%}, median "
           f"{h['median_head_rms_dev']:.1%}") if h else ""
  ctx.print_fn(f"converted: {rep['describe']} in {rep['seconds']:.1f} s{extra} -> {out}")


def _prepare_corpus(ctx: Context) -> None:
  from hydrahead_jax.transfer import corpus

  cfg = ctx.cfg
  out = cfg.corpus.out or ctx.path("corpus")
  if os.path.isfile(os.path.join(out, "manifest.json")):
    ctx.corpus = out
  elif any(s.data.source == tconfig.CORPUS for s in cfg.stages):
    corpus.build(cfg.corpus, ctx.tokenizer_path, out, print_fn=ctx.print_fn)
    ctx.corpus = out
  for s in cfg.stages:
    if s.data.source == tconfig.CORPUS:
      check_prepared(f"stages.{s.name}.data.source", out, s.data.seq_len)


def stage_data(ctx: Context, stage: StageConfig):
  """The stage's DataConfig with the teacher's tokenizer and the built corpus filled in."""
  d = stage.data
  kw = {}
  if d.source == tconfig.CORPUS:
    kw["source"] = ctx.corpus
  if d.tokenizer is None and ctx.tokenizer_path is not None and (d.source == "synthetic" or d.source == tconfig.CORPUS
                                                                  or d.synthetic_fraction > 0):
    kw["tokenizer"] = ctx.tokenizer_path
  if d.source == tconfig.CORPUS and ctx.tokenizer_path is None:
    kw["tokenizer"] = None
  return dataclasses.replace(d, **kw)


# -- evaluation ------------------------------------------------------------------------------------
def _prepare_eval(ctx: Context) -> None:
  if not ctx.cfg.eval.enabled:
    return
  from hydrahead_jax.interop.load import load_pretrained
  from hydrahead_jax.transfer import evaluate
  from hydrahead_jax.transfer.convert import calibration_batches

  e = ctx.cfg.eval
  ctx.eval_sets = evaluate.probe_sets(ctx.tokenizer, e)
  length = e.text_length or max(e.lengths)
  text = []
  if e.text_batches:
    rows = None
    if ctx.corpus is not None:
      from hydrahead_jax.transfer.corpus import heldout_rows

      rows = heldout_rows(ctx.corpus, ctx.tokenizer, length, e.batch_size * e.text_batches)
      ctx.eval_text_source = f"held-out corpus documents ({ctx.corpus})"
    if rows is None:
      rows = np.concatenate(calibration_batches(ctx.tokenizer, num=e.batch_size * e.text_batches, length=length + 1,
                                                batch_size=e.batch_size, seed=e.seed + 1))
      ctx.eval_text_source = "synthetic corpus (grammar, needles, MQAR)"
    text = [rows[i:i + e.batch_size] for i in range(0, len(rows), e.batch_size)]
  ctx.eval_text = text
  ctx.evals["teacher"] = _cached_eval(ctx, "teacher", lambda: ctx.teacher)
  ctx.evals["converted"] = _cached_eval(ctx, "converted", lambda: load_pretrained(ctx.converted)[1])


def _cached_eval(ctx: Context, name: str, get_model) -> dict | None:
  if not ctx.cfg.eval.enabled:
    return None
  from hydrahead_jax.transfer import evaluate

  path = ctx.path("eval", f"{name}.json")
  if os.path.isfile(path):
    return read_json(path)
  t0 = time.time()
  res = evaluate.evaluate(get_model(), ctx.eval_sets, ctx.eval_text, ctx.teacher, ctx.cfg.eval.batch_size,
                          ctx.pre.window)
  res["seconds"] = time.time() - t0
  _write(path, res)
  return res


# -- one stage -------------------------------------------------------------------------------------
STAGE_RESUME_SAFE = ("steps", "log_every", "checkpoint_every", "data.num_workers", "data.read_threads",
                     "data.prefetch_buffer")


def _stage_record(ctx: Context, i: int, stage: StageConfig, dcfg, scfg: ModelConfig, init_dir: str) -> dict:
  d = tconfig.to_dict(dataclasses.replace(stage, data=dcfg))
  return {"stage": d, "index": i, "student": scfg.to_dict(), "init": os.path.relpath(init_dir, ctx.workdir),
          "teacher": {"source": ctx.cfg.teacher.source, "dtype": ctx.cfg.teacher.dtype,
                      "compute_dtype": ctx.cfg.teacher.compute_dtype}}


def _check_record(where: str, old: Mapping, new: Mapping) -> None:
  a, b = tconfig.flat(json.loads(json.dumps(old))), tconfig.flat(json.loads(json.dumps(new, default=_json_default)))
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
  from hydrahead_jax.train.loop import TrainingDiverged
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

    pending: list = []
    timing = {"first": None, "time": 0.0, "steps": 0}
    t_stage = time.time()
    t_window, window_steps = time.time(), 0
    recent = collections.deque(maxlen=max(10, stage.log_every))
    last_saved = start if start else None
    pbar = None
    if cfg.progress:
      from tqdm.auto import tqdm

      pbar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True, mininterval=0.5,
                  file=sys.stderr)

    def flush():
      nonlocal t_window, window_steps
      if not pending:
        return
      rows = [(s, ph, S.host_metrics(stage, m)) for s, ph, m in pending]
      pending.clear()
      now = time.time()
      dt = now - t_window
      for s, ph, m in rows:
        if not m["ok"]:
          ctx.log.write({"step": offset + s, "stage": stage.name, "stage_step": s, **m})
          raise TrainingDiverged(s, m, last_saved)
      if timing["first"] is None:
        timing["first"] = dt
      else:
        timing["time"] += dt
        timing["steps"] += window_steps
      tok_s = window_steps * tps / dt if dt > 0 and window_steps else float("nan")
      for s, ph, m in rows:
        recent.append(m["loss"])
        if s % stage.log_every == 0 or s == rows[-1][0]:
          row = {"step": offset + s, "stage": stage.name, "stage_index": i, "stage_step": s, "phase": ph,
                 "tokens_per_s": tok_s, "time": now - t_stage, **{k: v for k, v in m.items() if k != "ok"}}
          ctx.log.write(row)
      s, ph, m = rows[-1]
      if pbar is not None:
        pbar.update(len(rows))
        pbar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
      elif s % stage.log_every == 0 or s == total:
        extra = " ".join(f"{k} {m[k]:.4f}" for k in ("kl", "ce", "nmse_max", "answer_acc") if k in m)
        pf(f"  [{stage.name}] step {s}/{total} loss {m['loss']:.4f} {extra} grad_norm {m['grad_norm']:.3f} "
           f"lr {m['lr']:.2e} tok/s {tok_s:,.0f}")
      t_window, window_steps = time.time(), 0

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
      pending.append((step, phase, metrics))
      window_steps += 1
      flush_now = False
      if first:
        jax.block_until_ready(metrics)
        window_steps = 0
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
        "final_loss": float(np.mean(recent)) if recent else None,
        "wall_s": wall, "tokens_this_run": new_tokens,
        "compile_and_first_step_s": timing["first"],
        "tokens_per_s": timing["steps"] * tps / timing["time"] if timing["time"] > 0 else None,
        "model": model_dir, "record": record,
    }
    if cfg.eval.enabled:
      summary["eval"] = _cached_eval(ctx, f"after_{stage.name}", lambda: model)
      ctx.evals[f"after {stage.name}"] = summary["eval"]
    _write(done_file, summary)
    tok_s = summary["tokens_per_s"]
    pf(f"stage {i + 1}/{len(cfg.stages)} {stage.name!r} done: {total * tps:,} tokens ({new_tokens:,} this run) in "
       f"{wall:.1f} s wall (compile + first step {timing['first'] or 0:.1f} s), "
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
