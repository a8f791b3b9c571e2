"""What one transfer run shares between its parts (``runner``, ``prepare``, ``stage_loop``): the run's state
(``Context``), the interruption it raises, the stage data it resolves, its cached held-out evaluation, and JSON
writing that takes numpy values."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Callable

import numpy as np

from hydrahead_jax.config import HeadLayout
from hydrahead_jax.interop.format import read_json, write_json
from hydrahead_jax.transfer import config as tconfig
from hydrahead_jax.transfer.config import StageConfig, TransferConfig
from hydrahead_jax.transfer.preflight import Preflight

Callback = Callable[[str, str, int, Any], None]  # (event: 'step' | 'checkpoint' | 'stage_end', stage, step, ctx)


class TransferInterrupted(Exception):
  """SIGTERM/SIGINT: the current stage saved a checkpoint; rerun the same command to resume."""


def save_json(path: str, data: Any) -> None:
  """``write_json`` that also takes numpy scalars and arrays."""
  write_json(path, data, default=json_default)


def json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


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


def cached_eval(ctx: Context, name: str, get_model) -> dict | None:
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
  save_json(path, res)
  return res
