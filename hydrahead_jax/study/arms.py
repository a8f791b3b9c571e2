"""Running and importing arms: one shared teacher and head scores, per arm a layout, the transfer recipe (the
resumable ``transfer.runner``), the evaluation and one result JSON (``<out_dir>/arm<id>.json``, written last: an
arm with a result file is done and skipped).

Result schema ``hydrahead-study-arm/1`` (docs/study.md): arm, name, role, kind, source (run | import), definition,
layout (fa_groups + how it was made), cost (FA budget, parameters, cache bytes per token), teacher_window,
transfer (tokens / wall s / tokens/s per stage; None for the teacher), eval (settings, cells task x length with n
and per-example scores, ppl by position), proxy (top-1 agreement + KL vs the teacher), budget, env.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

from hydrahead_jax.cli import UserError
from hydrahead_jax.interop.format import read_json, write_json
from hydrahead_jax.study import measure
from hydrahead_jax.study.config import ArmConfig, StudyConfig, StudyConfigError, arm_record

SCHEMA = "hydrahead-study-arm/1"


class ArmInterrupted(Exception):
  """The transfer of an arm stopped on a signal (it saved a checkpoint): rerun the same command to resume."""


def result_path(out_dir: str, arm_id: str) -> str:
  return os.path.join(out_dir, f"arm{arm_id}.json")


def read_result(path: str) -> dict:
  data = read_json(path, UserError, "result file")
  if data.get("schema") != SCHEMA:
    raise UserError(f"result file {path}: schema {data.get('schema')!r}, expected {SCHEMA!r}")
  return data


def transfer_block(summary: dict) -> dict:
  """Tokens, wall time and tokens/s per stage of a transfer summary (``runner.run``'s or its summary.json)."""
  keys = ("name", "kind", "steps", "tokens", "seq_len", "batch_size", "wall_s", "tokens_per_s",
          "compile_and_first_step_s", "final_loss", "resumed_at")
  stages = [{k: s.get(k) for k in keys} for s in summary.get("stages", [])]
  tokens = sum(s["tokens"] or 0 for s in stages)
  busy = [s["tokens"] / s["tokens_per_s"] for s in stages if s.get("tokens_per_s")]
  return {"stages": stages, "tokens": tokens, "tokens_per_stage": {s["name"]: s["tokens"] for s in stages},
          "wall_s": sum(s["wall_s"] or 0 for s in stages),
          "tokens_per_s": tokens / sum(busy) if busy and len(busy) == len(stages) else None,
          "workdir": summary.get("workdir"), "final_model": summary.get("final_model"),
          "note": "wall_s: of the run that finished each stage; tokens_per_s: steady state (compile excluded)"}


class Study:
  """A study config with its command-line overrides applied: the shared teacher, scores and arm configs."""

  def __init__(self, cfg: StudyConfig, overrides=(), out_dir: str | None = None, print_fn: Callable = print):
    from hydrahead_jax.transfer import config as tconfig

    self.cfg = cfg
    self.out_dir = out_dir or cfg.out_dir
    self.print = print_fn
    self.overrides = tuple(cfg.transfer_overrides) + tuple(cfg.budgets[cfg.budget]) + tuple(overrides)
    self.base = tconfig.load(cfg.transfer, self.overrides)
    self._teacher_cfg = None
    self._teacher = None
    self._scores = None

  # -- shared pieces -------------------------------------------------------------------------------
  def path(self, *parts) -> str:
    return os.path.abspath(os.path.join(self.cfg.workroot, *parts))

  def teacher_source(self) -> str:
    """The teacher every arm uses; ``teacher.source='train'`` trains it once for all arms (cached)."""
    t = self.base.teacher
    if t.source != "train":
      return t.source
    from hydrahead_jax.transfer.prepare import train_teacher

    return train_teacher(t, self.path("shared"), self.print)

  def teacher_cfg(self):
    if self._teacher_cfg is None:
      from hydrahead_jax.transfer.preflight import teacher_config

      self._teacher_cfg = teacher_config(self.base)
    return self._teacher_cfg

  def window(self) -> int:
    return self.cfg.teacher_window or self.base.teacher.window or self.teacher_cfg().max_position

  def teacher(self):
    """(model, tokenizer) of the teacher as ``python -m hydrahead_jax.eval`` loads it (float32)."""
    if self._teacher is None:
      from hydrahead_jax.interop.load import load

      _, model, tok = load(self.teacher_source(), tokenizer=self.base.teacher.tokenizer or True)
      self._teacher = (model, tok)
    return self._teacher

  def scores_path(self) -> str:
    return self.cfg.scores or self.path("shared", "selection", "head_scores.json")

  def has_scores(self) -> bool:
    return os.path.isfile(self.scores_path())

  def scores(self) -> dict:
    """The head scores the layouts are made from: ``StudyConfig.scores``, else one selection analysis of the
    teacher (the recipe's layout section; every score method an arm asks for), cached in the workroot."""
    if self._scores is not None:
      return self._scores
    from hydrahead_jax.selection import report

    path = self.scores_path()
    if not os.path.isfile(path):
      from hydrahead_jax.selection.analysis import AnalysisConfig, analyze
      from hydrahead_jax.selection.probes import make_probes

      lc = self.base.layout
      methods = tuple(dict.fromkeys(lc.methods + tuple(a.layout.score for a in self.cfg.arms
                                                       if a.layout is not None and a.layout.score)))
      self.print(f"selection: scoring the teacher's heads ({', '.join(methods)}) on probes of {list(lc.lengths)} "
                 f"tokens -> {path}")
      model, tok = self.teacher()
      sets = [make_probes(tok, L, tasks=lc.tasks, per_task=lc.per_task, seed=lc.seed) for L in lc.lengths]
      data = analyze(model, sets, AnalysisConfig(batch_size=lc.batch_size, chunk=lc.chunk, methods=methods,
                                                 seed=lc.seed), name="teacher")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      report.write_json(path + ".tmp", data)
      os.replace(path + ".tmp", path)
    try:
      self._scores = report.read_scores(path)
    except ValueError as e:
      raise StudyConfigError(str(e)) from None
    return self._scores

  # -- per arm ---------------------------------------------------------------------------------------
  def layout(self, arm: ArmConfig):
    """(HeadLayout, info, file) of a student arm; derived layouts are written to ``<out_dir>/layouts/``."""
    from hydrahead_jax.config import HeadLayout
    from hydrahead_jax.selection import policies
    from hydrahead_jax.selection.report import grid

    spec, t = arm.layout, self.teacher_cfg()
    if spec.file is not None:
      try:
        layout = policies.read_layout(spec.file)
        layout.validate(t.num_layers, t.num_kv_heads)
        info = read_json(spec.file)
      except ValueError as e:
        raise StudyConfigError(f"arm {arm.id}: layout file {spec.file}: {e}") from None
      info.pop("fa_groups", None)
      return layout, {**info, "file": spec.file}, os.path.abspath(spec.file)
    if spec.policy == "all_la":
      layout = HeadLayout.all_la(t.num_layers)
      info = {"policy": "all_la", "budget": "all LA", "describe": layout.describe(t.num_kv_heads)}
    else:
      scores = None
      if spec.needs_scores():
        data = self.scores()
        name = spec.score or data["selection_score_name"]
        if name not in data["scores"]:
          raise StudyConfigError(f"arm {arm.id}: score {name!r} is not in the head scores (it has "
                                 f"{sorted(data['scores'])})")
        scores = grid(data, name)
      try:
        layout, info = policies.make_layout(spec.policy, scores, spec.budget, num_groups=t.num_kv_heads,
                                            heads_per_group=t.heads_per_group, num_layers=t.num_layers,
                                            seed=spec.seed)
      except ValueError as e:
        raise StudyConfigError(f"arm {arm.id}: layout: {e}") from None
      if scores is not None:
        info["score"] = spec.score or self.scores()["selection_score_name"]
    file = os.path.abspath(os.path.join(self.out_dir, "layouts", f"arm{arm.id}.json"))
    os.makedirs(os.path.dirname(file), exist_ok=True)
    policies.write_layout(file + ".tmp", layout, info)
    os.replace(file + ".tmp", file)
    return layout, {**info, "file": os.path.relpath(file)}, file

  def workdir(self, arm: ArmConfig) -> str:
    return os.path.abspath(arm.workdir) if arm.workdir else self.path(f"arm{arm.id}")

  def transfer_cfg(self, arm: ArmConfig, layout_file: str, resolve_teacher: bool = True):
    """The arm's transfer config: the recipe with its layout, fusion, student fields and overrides (and the shared
    teacher in place of ``teacher.source='train'`` when ``resolve_teacher``: that trains it on first use)."""
    from hydrahead_jax.transfer import config as tconfig

    b = self.base
    teacher = b.teacher
    if teacher.source == "train" and resolve_teacher:
      teacher = dataclasses.replace(teacher, source=self.teacher_source(), train_config=None, train_overrides=())
    convert = dataclasses.replace(b.convert, fusion=arm.fusion or b.convert.fusion,
                                  student={**b.convert.student, **arm.student})
    cfg = b.replace(teacher=teacher, convert=convert, workdir=self.workdir(arm),
                    layout=dataclasses.replace(b.layout, file=layout_file))
    return tconfig.apply_overrides(cfg, arm.overrides)

  def expected_student(self, arm: ArmConfig, layout):
    from hydrahead_jax.transfer.preflight import student_cfg

    b = self.base
    convert = dataclasses.replace(b.convert, fusion=arm.fusion or b.convert.fusion,
                                  student={**b.convert.student, **arm.student})
    return student_cfg(b.replace(convert=convert), self.teacher_cfg(), layout)

  def budget(self, transfer: dict | None, eval_s: float | None, transfer_s: float | None) -> dict:
    return {"name": self.cfg.budget, "overrides": list(self.overrides),
            "train_tokens": transfer["tokens"] if transfer else 0,
            "train_tokens_per_stage": transfer["tokens_per_stage"] if transfer else {},
            "transfer_minutes": None if transfer_s is None else round(transfer_s / 60, 2),
            "eval_minutes": None if eval_s is None else round(eval_s / 60, 2),
            "target_minutes_per_arm": self.cfg.minutes_per_arm}

  def base_result(self, arm: ArmConfig, source: str) -> dict:
    return {"schema": SCHEMA, "study": self.cfg.name, "arm": arm.id, "name": arm.name, "role": arm.role,
            "kind": arm.kind, "source": source, "definition": arm_record(arm), "teacher_window": self.window(),
            "note": arm.note}

  def write(self, arm: ArmConfig, result: dict) -> str:
    path = result_path(self.out_dir, arm.id)
    write_json(path, result)
    return path


def check_arm(study: Study, arm: ArmConfig) -> str:
  """The transfer's preflight on the arm's config (teacher, layout, patterns, lengths, data; no weights, no
  computation): one line describing the arm, or the preflight's one-line error."""
  if arm.kind == "teacher":
    return f"arm {arm.id} ({arm.name}): the teacher, evaluation only"
  from hydrahead_jax.transfer.preflight import preflight

  if arm.layout.needs_scores() and not study.has_scores():  # checked for any layout (patterns must fit one)
    file, what = None, f"{arm.layout.policy} layout from head scores not computed yet"
  else:
    layout, info, file = study.layout(arm)
    what = info["describe"]
  pre = preflight(study.transfer_cfg(arm, file, resolve_teacher=False))
  tokens = ", ".join(f"{s.name} {s.steps * s.tokens_per_step:,}" for s in pre.cfg.stages)
  return f"arm {arm.id} ({arm.name}): ok; {what}; tokens {tokens}"


# -- run one arm -----------------------------------------------------------------------------------
def _ledger(workdir: str, key: str, seconds: float) -> float:
  """Adds ``seconds`` to the arm's time ledger (across commands / GPU stretches); returns the total."""
  path = os.path.join(workdir, "study_time.json")
  data = read_json(path) if os.path.isfile(path) else {}
  data[key] = data.get(key, 0.0) + seconds
  write_json(path, data)
  return data[key]


def _timed(workdir: str, key: str, fn):
  t0 = time.time()
  try:
    return fn()
  finally:
    _ledger(workdir, key, time.time() - t0)


def stale_note(study: Study, arm: ArmConfig, done: dict) -> str | None:
  """Why a stored result no longer matches the config (definition or evaluation settings), or None."""
  diffs = []
  if done.get("definition") != json.loads(json.dumps(arm_record(arm))):
    diffs.append("arm definition")
  want = measure.eval_settings(study.cfg.eval)
  have = done.get("eval", {}).get("settings", {})
  diffs += [f"eval {k} {have.get(k)!r} (config: {want[k]!r})" for k in want if have.get(k) != want[k]]
  return "; ".join(diffs) or None


def run_arm(study: Study, arm: ArmConfig) -> dict:
  """Runs (or resumes) one arm and writes its result JSON; a done arm is read back and skipped."""
  from hydrahead_jax.interop.load import load

  pf = study.print
  path = result_path(study.out_dir, arm.id)
  if os.path.isfile(path):
    done = read_result(path)
    note = stale_note(study, arm, done)
    pf(f"arm {arm.id} ({arm.name}): done ({done['source']}, {done['env'].get('date')}) -> {path}; skipped"
       + (f" (differs from the config: {note}; delete the file to redo it)" if note else ""))
    return done
  workdir = study.workdir(arm)
  os.makedirs(workdir, exist_ok=True)
  result = study.base_result(arm, "run")
  pf(f"arm {arm.id} ({arm.name}): workdir {workdir}")
  e = study.cfg.eval
  if arm.kind == "teacher":
    model, tok = study.teacher()
    transfer, result["layout"] = None, {"describe": "the teacher (all FA)", "fa_groups": None}
    proxy = dict(measure.TEACHER_PROXY, length=e.proxy_length, docs=0)
  else:
    from hydrahead_jax.train.loop import TrainingDiverged
    from hydrahead_jax.transfer.runner import run

    layout, info, file = study.layout(arm)
    result["layout"] = {**info, "fa_groups": [list(x) for x in layout.fa_groups]}
    tcfg = study.transfer_cfg(arm, file)
    pf(f"arm {arm.id}: layout {info['describe']}; transfer {study.cfg.transfer} ({study.cfg.budget} budget)")
    try:
      summary = _timed(workdir, "transfer_s", lambda: run(tcfg, print_fn=pf))
    except TrainingDiverged as err:
      raise UserError(f"arm {arm.id}: training diverged ({err}); see {workdir}/metrics.jsonl") from None
    if summary["status"] != "complete":
      raise ArmInterrupted(f"arm {arm.id}: transfer interrupted (checkpoint saved); rerun the same command to resume")
    transfer = transfer_block(summary)
    _, model, tok = load(summary["final_model"])
    proxy = None
  cfg = model.cfg
  result["cost"] = measure.cost(cfg, model.num_params(), max(e.lengths))
  result["transfer"] = transfer
  result["eval"] = _timed(workdir, "eval_s", lambda: measure.run_eval(model, tok, e, os.path.join(
      workdir, "study_eval"), f"arm {arm.id}", pf))
  if proxy is None:
    proxy = _timed(workdir, "eval_s", lambda: measure.short_context_proxy(model, study.teacher()[0], tok, e))
  result["proxy"] = proxy
  times = read_json(os.path.join(workdir, "study_time.json"))
  result["budget"] = study.budget(transfer, times.get("eval_s"), times.get("transfer_s"))
  result["env"] = measure.environment()
  out = study.write(arm, result)
  pf(f"arm {arm.id} ({arm.name}): done -> {out}")
  return result


# -- import existing runs --------------------------------------------------------------------------
def _pick_model(models: dict, name: str | None, arm: ArmConfig, summary: dict | None, study: Study) -> str:
  if name is not None:
    if name not in models:
      raise UserError(f"--model {name!r}: not in the eval results (models: {', '.join(models)})")
    return name
  if arm.kind == "teacher":
    hits = [k for k, m in models.items() if m.get("spec") == study.base.teacher.source]
  elif summary and summary.get("final_model"):
    final = os.path.normpath(summary["final_model"])
    hits = [k for k, m in models.items() if final.endswith(os.path.normpath(m.get("spec", "")).lstrip("./"))
            and m.get("spec")]
  else:
    hits = []
  if len(hits) == 1:
    return hits[0]
  if len(models) == 1:
    return next(iter(models))
  raise UserError(f"eval results hold several models ({', '.join(models)}); say which is arm {arm.id} with --model")


def import_arm(study: Study, arm: ArmConfig, eval_path: str, summary_path: str | None, model_name: str | None,
               force: bool = False) -> dict:
  """An arm's result from an existing ``python -m hydrahead_jax.eval`` results.json (+ the transfer's
  summary.json for a student arm), checked against the arm's definition (layout, fusion, sharing)."""
  from hydrahead_jax.config import ModelConfig

  path = result_path(study.out_dir, arm.id)
  if os.path.isfile(path) and not force:
    raise UserError(f"arm {arm.id} already has a result ({path}); pass --force to replace it")
  for p in [eval_path] + ([summary_path] if summary_path else []):
    if not os.path.isfile(p):
      raise UserError(f"{p}: no such file")
  try:
    results = read_json(eval_path)
    models, ecfg = results["models"], results["config"]
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise UserError(f"--eval {eval_path}: not a results.json of python -m hydrahead_jax.eval ({e})") from None
  summary = None
  if arm.kind == "student":
    if not summary_path:
      raise UserError(f"arm {arm.id} is a student: give its transfer's summary.json with --transfer-summary "
                      "(the training budget is part of the result)")
    try:
      summary = read_json(summary_path)
      last = summary["stages"][-1]
      scfg = ModelConfig.from_dict(last["record"]["student"])
    except (OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
      raise UserError(f"--transfer-summary {summary_path}: not a complete transfer summary.json ({e})") from None
    if summary.get("status") != "complete":
      raise UserError(f"--transfer-summary {summary_path}: status {summary.get('status')!r}, not complete")
  elif summary_path:
    raise UserError(f"arm {arm.id} is the teacher: it has no transfer (leave out --transfer-summary)")
  name = _pick_model(models, model_name, arm, summary, study)
  m = models[name]
  result = study.base_result(arm, "import")
  if arm.kind == "student":
    layout, info, _ = study.layout(arm)
    want = study.expected_student(arm, layout)
    for field in ("layout", "fusion", "la_sharing"):
      if getattr(scfg, field) != getattr(want, field):
        got = getattr(scfg, field)
        got = got.describe(scfg.num_kv_heads) if field == "layout" else got
        exp = getattr(want, field)
        exp = exp.describe(want.num_kv_heads) if field == "layout" else exp
        raise UserError(f"arm {arm.id} ({arm.name}): the imported run has {field} {got!r}, the arm is {exp!r}; "
                        "import it as another arm (or fix the study config)")
    result["layout"] = {**info, "fa_groups": [list(x) for x in layout.fa_groups]}
    cfg = scfg
    result["transfer"] = transfer_block(summary)
    expected = {s.name: s.steps * s.tokens_per_step
                for s in study.transfer_cfg(arm, info["file"], resolve_teacher=False).stages}
    if result["transfer"]["tokens_per_stage"] != expected:
      result["budget_note"] = (f"imported run's tokens per stage {result['transfer']['tokens_per_stage']} differ "
                               f"from the study budget {study.cfg.budget!r} ({expected})")
      study.print(f"note: {result['budget_note']}")
  else:
    cfg = study.teacher_cfg()
    result["layout"] = {"describe": "the teacher (all FA)", "fa_groups": None}
    result["transfer"] = None
  result["cost"] = measure.cost(cfg, m.get("params"), max(int(x) for x in ecfg["lengths"]))
  result["eval"] = measure.import_eval(m, ecfg)
  result["proxy"] = (dict(measure.TEACHER_PROXY, length=study.cfg.eval.proxy_length, docs=0)
                     if arm.kind == "teacher" else None)
  result["budget"] = study.budget(result["transfer"], m.get("seconds"), None)
  result["budget"]["overrides"] = None  # unknown: the imported run's own command
  result["imported_from"] = {"eval": os.path.abspath(eval_path), "model": name, "spec": m.get("spec"),
                             "transfer_summary": os.path.abspath(summary_path) if summary_path else None}
  result["env"] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": "unknown (imported)",
                   "python": ecfg.get("python"), "note": "imported: environment of the original run not recorded"}
  out = study.write(arm, result)
  study.print(f"arm {arm.id} ({arm.name}): imported model {name!r} of {eval_path} -> {out}")
  return result
