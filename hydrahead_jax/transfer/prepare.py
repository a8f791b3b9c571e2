"""Everything before the stages, each step cached in the run directory: the teacher (loaded, or trained with the
train.py loop), its tokenizer, the head layout (selection analysis + policy, or a file), the calibrated conversion,
the real-text corpus and the held-out evaluation sets."""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np

from hydrahead_jax.config import HeadLayout
from hydrahead_jax.transfer import config as tconfig
from hydrahead_jax.transfer.config import TransferConfigError
from hydrahead_jax.transfer.context import Context, TransferInterrupted, cached_eval, json_default, save_json
from hydrahead_jax.transfer.preflight import check_prepared, student_cfg


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
    save_json(os.path.join(d, "tokenizer_config.json"), names)
    os.replace(path + ".tmp", path)
  from hydrahead_jax.data.tokenizer import load_tokenizer

  back = load_tokenizer(path)
  if (back.vocab_size, back.bos_id, back.eos_id, back.pad_id) != (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id):
    raise RuntimeError(f"{path}: the saved tokenizer does not reproduce the teacher's special tokens")
  return path


def prepare_teacher(ctx: Context) -> None:
  from hydrahead_jax.interop.load import load

  t = ctx.cfg.teacher
  source = train_teacher(t, ctx.workdir, ctx.print_fn) if t.source == "train" else t.source
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


def prepare_layout(ctx: Context) -> None:
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


def prepare_converted(ctx: Context) -> None:
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
    if old is not None and json.loads(json.dumps(old)) != json.loads(json.dumps(record, default=json_default)):
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


def prepare_corpus(ctx: Context) -> None:
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


def prepare_eval(ctx: Context) -> None:
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
  ctx.evals["teacher"] = cached_eval(ctx, "teacher", lambda: ctx.teacher)
  ctx.evals["converted"] = cached_eval(ctx, "converted", lambda: load_pretrained(ctx.converted)[1])
