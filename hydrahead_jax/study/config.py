"""Configuration of a replication study: the arms, the shared transfer recipe, the evaluation and the verdict
thresholds.

A study config file is a Python file whose ``get_config()`` returns a ``StudyConfig`` (``configs/study/*.py``).
Every arm is the same transfer recipe (``transfer``: a transfer config file, plus ``transfer_overrides`` and the
named ``budgets``' overrides, applied to every arm alike) with its own head layout and model options; the teacher
arm is evaluated only. Arms are found by ``role`` by the verdict logic (``study.verdict``), never by id.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any, Mapping

from hydrahead_jax.cli import UserError, import_config_file

KINDS = ("teacher", "student")
# where an arm's layout comes from: a file, a selection policy on head scores, or every head LA
LAYOUT_POLICIES = ("global", "per_layer", "layerwise_score", "layerwise_even", "random", "all_la")
# what the verdict logic looks arms up by
ROLES = ("teacher", "head_exact", "head_retrieval", "random", "layerwise_budget", "layerwise_3to1", "all_la",
         "no_fusion", "kv_sharing", "other")
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")


class StudyConfigError(UserError, ValueError):
  """A bad study config or command line (one line)."""


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
  """``file``: a layout JSON (selection output); else ``policy`` (``selection.policies`` or 'all_la') at ``budget``
  on the ``score`` grid of the study's head scores (``StudyConfig.scores``), seeded for 'random'."""

  file: str | None = None
  policy: str | None = None
  budget: str = "7:1"
  score: str | None = None  # None: the scores file's selection score
  seed: int = 0

  def needs_scores(self) -> bool:
    return self.file is None and self.policy not in ("random", "all_la", "layerwise_even")


@dataclasses.dataclass(frozen=True)
class ArmConfig:
  id: str
  name: str
  role: str = "other"
  kind: str = "student"
  layout: LayoutSpec | None = None  # None only for the teacher
  fusion: str | None = None  # convert.fusion of this arm (None: the recipe's)
  student: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # merged into convert.student
  overrides: tuple[str, ...] = ()  # --set overrides of this arm's transfer config only
  workdir: str | None = None  # transfer run directory (default <workroot>/arm<id>)
  note: str = ""


@dataclasses.dataclass(frozen=True)
class StudyEval:
  """The same inputs for every arm: ``hydrahead_jax.eval`` tasks x lengths x examples at one seed, perplexity by
  position (``ppl`` in tasks: on documents of the longest length), and the short-context proxy (top-1 agreement
  and KL(teacher || arm) on ``proxy_docs`` held-out documents of ``proxy_length`` tokens)."""

  tasks: tuple[str, ...] = RULER_TASKS + ("mqar", "ppl")
  retrieval_tasks: tuple[str, ...] = RULER_TASKS  # averaged into the retrieval score of the verdicts
  lengths: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
  examples: int = 32
  seed: int = 0
  chat: str = "auto"
  ppl_docs: int = 2
  batch_size: int = 4
  chunk_size: int = 1024
  max_new_tokens: int = 64
  proxy_length: int = 1024
  proxy_docs: int = 16
  proxy_batch: int = 2


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Verdict thresholds (docs/study.md). Accuracies are fractions; ``z`` standard errors make an interval."""

  margin: float = 0.10  # claim 1: "about as well" = head-level at most this much below layer-wise
  min_gain: float = 0.05  # claims 2-4: the smallest advantage that counts
  floor: float = 0.10  # claims 1-3: both arms below this retrieval score = nothing to compare at this budget
  z: float = 2.0


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  name: str
  transfer: str  # a transfer config file (get_config() -> TransferConfig): the recipe every arm runs
  arms: tuple[ArmConfig, ...]
  transfer_overrides: tuple[str, ...] = ()
  budgets: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: {"recipe": ()})
  budget: str = "recipe"  # which of ``budgets`` runs (--budget)
  minutes_per_arm: float | None = None  # the stretch an arm (transfer + evaluation) is sized for
  scores: str | None = None  # head_scores.json; None: selection analysis on the teacher (base layout section)
  teacher_window: int | None = None  # None: the teacher config's max_position
  eval: StudyEval = dataclasses.field(default_factory=StudyEval)
  thresholds: Thresholds = dataclasses.field(default_factory=Thresholds)
  workroot: str = "runs/study"
  out_dir: str = "docs/results"
  report: str = "docs/results.md"
  xla_flags: str = ""

  def arm(self, arm_id: str) -> ArmConfig:
    for a in self.arms:
      if a.id == arm_id:
        return a
    raise StudyConfigError(f"unknown arm {arm_id!r}; this study has arms {', '.join(a.id for a in self.arms)}")

  def replace(self, **kw) -> "StudyConfig":
    return dataclasses.replace(self, **kw)


def _err(msg: str) -> StudyConfigError:
  return StudyConfigError(f"study config: {msg}")


def validate(cfg: StudyConfig) -> StudyConfig:
  if not isinstance(cfg, StudyConfig):
    raise _err(f"get_config() must return a StudyConfig, got {type(cfg).__name__}")
  if not cfg.arms:
    raise _err("no arms")
  ids = [a.id for a in cfg.arms]
  dup = sorted({i for i in ids if ids.count(i) > 1})
  if dup:
    raise _err(f"arm ids must be unique; repeated: {dup}")
  for a in cfg.arms:
    where = f"arm {a.id!r}"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", a.id):
      raise _err(f"{where}: ids use letters, digits, '_' and '-' (they name files)")
    if a.kind not in KINDS:
      raise _err(f"{where}: kind {a.kind!r}; choose one of {KINDS}")
    if a.role not in ROLES:
      close = difflib.get_close_matches(a.role, ROLES, n=1)
      raise _err(f"{where}: role {a.role!r}{'; did you mean ' + repr(close[0]) + '?' if close else ''} "
                 f"(choose one of {ROLES})")
    if (a.kind == "teacher") != (a.layout is None):
      raise _err(f"{where}: the teacher arm has no layout; every student arm needs one")
    if a.layout is not None:
      lay = a.layout
      if lay.file is None and lay.policy not in LAYOUT_POLICIES:
        raise _err(f"{where}: layout policy {lay.policy!r}; choose one of {LAYOUT_POLICIES} (or give a file)")
      if lay.file is not None and not os.path.isfile(lay.file):
        raise _err(f"{where}: layout file {lay.file!r} does not exist")
  if cfg.budget not in cfg.budgets:
    raise _err(f"budget {cfg.budget!r} is not one of {sorted(cfg.budgets)}")
  e = cfg.eval
  from hydrahead_jax.eval.evaluate import ALL_TASKS

  bad = [t for t in e.tasks if t not in ALL_TASKS] + [t for t in e.retrieval_tasks if t not in e.tasks]
  if bad:
    raise _err(f"eval tasks {bad}: each must be one of {ALL_TASKS} (retrieval_tasks also in tasks)")
  if not e.lengths or min(e.lengths) < 1 or min(e.examples, e.ppl_docs, e.batch_size, e.chunk_size,
                                                  e.max_new_tokens, e.proxy_docs, e.proxy_batch,
                                                  e.proxy_length) < 1:
    raise _err("eval: lengths, examples, ppl_docs, batch sizes, chunk_size, max_new_tokens and proxy_* must be >= 1")
  t = cfg.thresholds
  if min(t.margin, t.min_gain, t.floor, t.z) < 0:
    raise _err("thresholds must be >= 0")
  if not os.path.isfile(cfg.transfer):
    raise _err(f"transfer config file {cfg.transfer!r} does not exist")
  if cfg.scores is not None and not os.path.isfile(cfg.scores):
    raise _err(f"scores file {cfg.scores!r} does not exist")
  return cfg


def load(path: str) -> StudyConfig:
  return validate(import_config_file(path, StudyConfigError, "study config file").get_config())


def parse_arms(text: str | None, cfg: StudyConfig) -> list[ArmConfig]:
  """'2,4' / 'all' / '1-3' -> arms in the config's order (an unknown id is one error line)."""
  if text is None:
    return []
  ids = [a.id for a in cfg.arms]
  if text.strip() == "all":
    return list(cfg.arms)
  want: list[str] = []
  for part in (p.strip() for p in text.split(",") if p.strip()):
    m = re.fullmatch(r"(\d+)-(\d+)", part)
    if m and part not in ids:
      lo, hi = int(m.group(1)), int(m.group(2))
      want += [i for i in ids if re.fullmatch(r"\d+", i) and lo <= int(i) <= hi]
    else:
      want.append(part)
  bad = [w for w in want if w not in ids]
  if bad or not want:
    raise StudyConfigError(f"--arms: unknown arm {', '.join(bad) or '(none given)'}; this study has arms "
                           f"{', '.join(ids)} (or 'all')")
  return [a for a in cfg.arms if a.id in want]


def arm_record(arm: ArmConfig) -> dict:
  """The arm's definition as plain JSON (stored with its result; a changed definition is reported)."""
  from hydrahead_jax.transfer.config import to_dict

  return to_dict(arm)
