"""Configuration of the three-stage transfer (teacher -> converted student -> trained HydraHead model).

A transfer config file is a Python file whose ``get_config()`` returns a ``TransferConfig``; ``train.py``
sees that type and hands the run to ``hydrahead_jax.transfer.runner``. Overrides use dotted keys like plain
training, with stages addressed by name::

    --set stages.distil.steps=200 --set stages.long.data.seq_len=16384 --set teacher.source=smollm2

Sections: ``teacher`` (where the teacher comes from), ``layout`` (a selection output JSON, or a policy + budget
that runs the selection first), ``convert`` (calibration), ``corpus`` (real text built from installed Python
packages, used by stages whose ``data.source`` is ``"corpus"``), ``stages`` (ordered ``StageConfig``s),
``eval`` (held-out retrieval probes for the before/after table), ``checkpoint``. Every bad key or value is one
``TransferConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from typing import Any, Mapping, Sequence

from hydrahead_jax.cli import UserError, import_config_file
from hydrahead_jax.data.pipeline import DataConfig
from hydrahead_jax.train import config_lib
from hydrahead_jax.train.config_lib import CheckpointConfig, OptimConfig

KINDS = ("align", "distil", "long")
ROPE_MODES = ("keep", "raise_base")
CORPUS = "corpus"  # data.source value: the corpus the runner builds from installed packages
# Default trainable parameters per stage kind (canonical names, fnmatch; '*' spans dots).
ALIGN_TRAINABLE = ("*.mixer.la.*", "*.mixer.fusion.*")
ALL = ("*",)


class TransferConfigError(UserError, ValueError):
  """A bad transfer config (one line naming the key)."""


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Where the teacher comes from.

  ``source``: anything ``hydrahead_jax.interop.load`` reads (``smollm2``, a ``.gguf``, a HF directory, one of our
  model directories), or ``"train"``: train one with ``train_config`` (a ``train.py`` config file) in
  ``<workdir>/teacher_run`` by the same training loop (resumable; cached once done) and use its final weights.
  """

  source: str = "smollm2"
  train_config: str | None = None
  train_overrides: tuple[str, ...] = ()
  dtype: str = "bfloat16"  # teacher parameter dtype (it only runs forward, under stop_gradient)
  compute_dtype: str | None = None  # default: dtype
  tokenizer: str | None = None  # a tokenizer.json overriding the source's
  window: int | None = None  # the teacher's trained context; None: the model config's max_position
  # Kernel choices of the teacher's model config (fields of interop.load.RESTORE_OVERRIDES, e.g.
  # {"fa_packed_implementation": "mask"}); the converted student inherits them (convert.student overrides).
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
  """A selection output (``file``: ``layout_<policy>.json``), or ``policy`` + ``budget`` after an analysis run
  on the teacher (exact patching on probes of ``lengths``; cached in ``<workdir>/selection``)."""

  file: str | None = None
  policy: str = "global"
  budget: str = "7:1"
  lengths: tuple[int, ...] = (512,)
  tasks: tuple[str, ...] = ("niah_single", "niah_multikey", "niah_multivalue", "mqar")
  per_task: int = 4
  methods: tuple[str, ...] = ("exact",)
  batch_size: int = 4
  chunk: int = 8
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """Conversion (``transfer.convert.convert_teacher``) and its fusion-scale calibration on synthetic text."""

  calib_num: int = 16  # calibration sequences (0: no calibration)
  calib_length: int = 512
  calib_batch: int = 4
  heldout_num: int = 8  # held-out sequences for the RMS check (0: none)
  inputs: str = "teacher"  # 'teacher' (one pass with the teacher's layer inputs) or 'student' (iterated)
  iterations: int = 3
  fusion: str | None = None  # None: the student config's default ('scale_norm')
  seed: int = 0
  student: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # other ModelConfig fields of the student


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Real text offline: sources and docs of the Python packages installed in this interpreter, tokenized with the
  teacher's tokenizer through ``hydrahead_jax.data.prepare`` into ``<workdir>/corpus`` (or ``out``)."""

  packages: tuple[str, ...] = ()  # distribution names; empty: every installed distribution
  max_tokens: int = 4_000_000  # stop once about this many tokens are collected
  doc_chars: int = 200_000  # a document = consecutive files of one package, up to this many characters
  extensions: tuple[str, ...] = (".py", ".md", ".rst", ".txt")
  heldout_docs: int = 8  # documents (the last collected) kept out of training for evaluation
  out: str | None = None


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """One stage. ``kind``: ``align`` (stage 1: every student mixer on the teacher's layer inputs, normalised MSE to
  the teacher's attention output, all layers at once), ``distil`` (stage 2: KL(teacher || student) with temperature,
  optionally + CE) or ``long`` (stage 3: ``distil`` at long lengths: KL inside ``teacher_window``, CE beyond it, RoPE
  handling for the FA heads)."""

  name: str = "align"
  kind: str = "align"
  steps: int = 100
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(trainable=ALL))
  # (first step, trainable patterns) per phase, e.g. ((0, ('*.mixer.*',)), (100, ('*',))); empty: optim.trainable
  # for the whole stage. optim.freeze applies in every phase.
  trainable_schedule: tuple[tuple[int, tuple[str, ...]], ...] = ()
  grad_accum: int = 1
  kl_weight: float = 1.0
  ce_weight: float = 0.0
  answer_weight: float = 1.0  # CE weight of answer tokens (retrieval targets) relative to other tokens
  temperature: float = 1.0
  teacher_window: int | None = None  # KL only at positions < window; CE only at positions >= window
  logits_chunk: int = 512  # sequence positions per chunk of the KL/CE (vocabulary-sized tensors per chunk only)
  rope: str = "keep"  # FA heads' RoPE from this stage on: 'keep' or 'raise_base' (rope_theta = rope_theta below)
  rope_theta: float | None = None
  remat: str | None = None  # student rematerialisation in this stage (ModelConfig.remat); None: as converted
  log_every: int = 10
  checkpoint_every: int = 100

  @property
  def tokens_per_step(self) -> int:
    return self.data.batch_size * self.data.seq_len


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out retrieval probes (``selection.probes``) scored teacher-forced for the before/after table."""

  tasks: tuple[str, ...] = ("niah_single", "mqar")
  lengths: tuple[int, ...] = (512,)
  per_task: int = 8
  seed: int = 7
  batch_size: int = 8
  text_batches: int = 2  # held-out text batches (corpus held-out documents, else synthetic text) for CE / KL
  text_length: int | None = None  # tokens per held-out text row; None: max(lengths)
  enabled: bool = True


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
  layout: LayoutConfig = dataclasses.field(default_factory=LayoutConfig)
  convert: ConvertConfig = dataclasses.field(default_factory=ConvertConfig)
  corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
  stages: tuple[StageConfig, ...] = ()
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  workdir: str = "runs/transfer"
  seed: int = 0
  progress: bool = True
  xla_flags: str = ""  # appended to XLA_FLAGS by train.py before JAX starts

  def stage(self, name: str) -> StageConfig:
    for s in self.stages:
      if s.name == name:
        return s
    raise KeyError(name)

  def replace(self, **kw) -> "TransferConfig":
    return dataclasses.replace(self, **kw)


# -- checks ---------------------------------------------------------------------------------------
def _err(key: str, msg: str) -> TransferConfigError:
  return TransferConfigError(f"transfer config key {key!r}: {msg}")


def _typecheck(obj, prefix: str):
  """A copy of ``obj`` (a config dataclass) with every field checked against its annotation."""
  hints = typing.get_type_hints(type(obj))
  vals = {}
  for f in dataclasses.fields(obj):
    key = f"{prefix}.{f.name}" if prefix else f.name
    v, tp = getattr(obj, f.name), hints[f.name]
    if f.name == "stages":
      if not isinstance(v, (list, tuple)):
        raise _err(key, f"expected a tuple of StageConfig, got {type(v).__name__}")
      vals[f.name] = tuple(_typecheck(_expect(s, StageConfig, f"{key}[{i}]"), f"stages.{getattr(s, 'name', i)}")
                           for i, s in enumerate(v))
    elif dataclasses.is_dataclass(tp):
      vals[f.name] = _typecheck(_expect(v, tp, key), key)
    else:
      try:
        vals[f.name] = config_lib._check_value(key, v, tp)
      except ValueError as e:
        raise TransferConfigError(str(e).replace("config key", "transfer config key")) from None
  try:
    return type(obj)(**vals)
  except ValueError as e:
    raise _err(prefix or "config", str(e)) from None


def _expect(v, cls, key):
  if not isinstance(v, cls):
    raise _err(key, f"expected a {cls.__name__}, got {type(v).__name__}")
  return v


def validate(cfg: TransferConfig) -> TransferConfig:
  """Type checks and value checks that need no files, no teacher and no computation."""
  if not isinstance(cfg, TransferConfig):
    raise TransferConfigError(f"config: get_config() must return a TransferConfig, got {type(cfg).__name__}")
  cfg = _typecheck(cfg, "")
  t = cfg.teacher
  if t.source == "train" and not t.train_config:
    raise _err("teacher.train_config", "teacher.source='train' needs a train.py config file for the teacher")
  if t.window is not None and t.window < 1:
    raise _err("teacher.window", f"must be >= 1, got {t.window}")
  if cfg.layout.file is None:
    from hydrahead_jax.selection import policies  # noqa: PLC0415

    if cfg.layout.policy not in policies.POLICIES:
      raise _err("layout.policy", f"{cfg.layout.policy!r}; choose one of {policies.POLICIES} (or give layout.file)")
    if not cfg.layout.lengths or min(cfg.layout.lengths) < 8:
      raise _err("layout.lengths", f"need probe lengths >= 8, got {cfg.layout.lengths}")
  c = cfg.convert
  if c.inputs not in ("teacher", "student"):
    raise _err("convert.inputs", f"{c.inputs!r}; choose 'teacher' or 'student'")
  if c.calib_num < 0 or c.heldout_num < 0 or c.calib_batch < 1 or c.calib_length < 2:
    raise _err("convert", "calib_num/heldout_num >= 0, calib_batch >= 1, calib_length >= 2")
  if c.calib_num and c.calib_num < c.calib_batch:
    raise _err("convert.calib_num", f"{c.calib_num} is less than convert.calib_batch={c.calib_batch}")
  if not cfg.stages:
    raise _err("stages", "no stages; give at least one StageConfig")
  names = [s.name for s in cfg.stages]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise _err("stages", f"stage names must be unique; repeated: {dup}")
  for s in cfg.stages:
    _check_stage(s)
  if cfg.eval.per_task < 1 or cfg.eval.batch_size < 1 or cfg.eval.text_batches < 0:
    raise _err("eval", "per_task and batch_size must be >= 1, text_batches >= 0")
  if cfg.corpus.max_tokens < 1 or cfg.corpus.doc_chars < 1 or cfg.corpus.heldout_docs < 0:
    raise _err("corpus", "max_tokens and doc_chars must be >= 1, heldout_docs >= 0")
  return cfg


def _check_stage(s: StageConfig) -> None:
  p = f"stages.{s.name}"
  if not s.name or not all(ch.isalnum() or ch in "_-" for ch in s.name):
    raise _err(f"{p}.name", "use letters, digits, '_' and '-' (it names a directory)")
  if s.kind not in KINDS:
    close = difflib.get_close_matches(s.kind, KINDS, n=1)
    raise _err(f"{p}.kind", f"unknown kind {s.kind!r}{'; did you mean ' + repr(close[0]) + '?' if close else ''} "
                            f"(choose one of {KINDS})")
  if s.steps < 1:
    raise _err(f"{p}.steps", f"must be >= 1, got {s.steps}")
  if s.grad_accum < 1 or s.data.batch_size % s.grad_accum:
    raise _err(f"{p}.grad_accum", f"must be >= 1 and divide data.batch_size={s.data.batch_size}, got {s.grad_accum}")
  if s.log_every < 1 or s.checkpoint_every < 1:
    raise _err(p, "log_every and checkpoint_every must be >= 1")
  if s.logits_chunk < 1:
    raise _err(f"{p}.logits_chunk", f"must be >= 1, got {s.logits_chunk}")
  if s.kind != "align":
    if s.kl_weight < 0 or s.ce_weight < 0 or s.kl_weight + s.ce_weight <= 0:
      raise _err(f"{p}.kl_weight", "kl_weight and ce_weight must be >= 0 with a positive sum")
    if s.temperature <= 0:
      raise _err(f"{p}.temperature", f"must be > 0, got {s.temperature}")
    if s.answer_weight < 0:
      raise _err(f"{p}.answer_weight", f"must be >= 0, got {s.answer_weight}")
  if s.rope not in ROPE_MODES:
    raise _err(f"{p}.rope", f"{s.rope!r}; choose one of {ROPE_MODES}")
  if s.rope == "raise_base" and (s.rope_theta is None or s.rope_theta <= 0):
    raise _err(f"{p}.rope_theta", "rope='raise_base' needs the new base, e.g. rope_theta=1e6")
  if s.rope == "keep" and s.rope_theta is not None:
    raise _err(f"{p}.rope_theta", "set only with rope='raise_base'")
  if s.teacher_window is not None and s.teacher_window < 1:
    raise _err(f"{p}.teacher_window", f"must be >= 1, got {s.teacher_window}")
  if s.remat is not None and s.remat not in ("none", "full", "dots"):
    raise _err(f"{p}.remat", f"{s.remat!r}; choose none, full or dots")
  starts = [st for st, _ in s.trainable_schedule]
  if s.trainable_schedule and (starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= s.steps):
    raise _err(f"{p}.trainable_schedule", f"phase starts must begin at 0, increase and be < steps={s.steps}; "
                                          f"got {starts}")
  if any(not pats for _, pats in s.trainable_schedule):
    raise _err(f"{p}.trainable_schedule", "every phase needs at least one pattern")


def phases(s: StageConfig) -> tuple[tuple[int, tuple[str, ...]], ...]:
  """(first step, trainable patterns) of every phase of a stage."""
  return s.trainable_schedule or ((0, s.optim.trainable),)


# -- overrides ------------------------------------------------------------------------------------
def _fields(obj) -> list[str]:
  return [f.name for f in dataclasses.fields(obj)]


def _set(obj, parts: Sequence[str], text: str, key: str):
  if isinstance(obj, tuple):  # stages, by name
    names = [s.name for s in obj]
    if parts[0] not in names:
      raise _err(key, f"no stage named {parts[0]!r} (stages: {', '.join(names)})")
    if len(parts) == 1:
      raise _err(key, "give a stage field, e.g. stages.NAME.steps=100")
    i = names.index(parts[0])
    return obj[:i] + (_set(obj[i], parts[1:], text, key),) + obj[i + 1:]
  field = parts[0]
  if field not in _fields(obj):
    close = difflib.get_close_matches(field, _fields(obj), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TransferConfigError(f"transfer config: unknown key {key!r}{hint} ({type(obj).__name__} has: "
                              f"{', '.join(_fields(obj))})")
  cur = getattr(obj, field)
  if len(parts) > 1:
    if not (dataclasses.is_dataclass(cur) or isinstance(cur, tuple) and cur and dataclasses.is_dataclass(cur[0])):
      raise _err(key, f"{field!r} has no sub-keys")
    new = _set(cur, parts[1:], text, key)
  else:
    tp = typing.get_type_hints(type(obj))[field]
    if dataclasses.is_dataclass(tp) or field == "stages":
      raise _err(key, "set its fields one by one (dotted keys)")
    try:
      new = config_lib._check_value(key, config_lib._parse_string(key, text, tp), tp)
    except ValueError as e:
      raise TransferConfigError(str(e).replace("config key", "transfer config key")) from None
  try:
    return dataclasses.replace(obj, **{field: new})
  except ValueError as e:
    raise _err(key, str(e)) from None


def apply_overrides(cfg: TransferConfig, overrides: Sequence[str]) -> TransferConfig:
  for item in overrides:
    if "=" not in item:
      raise TransferConfigError(f"transfer config: override {item!r} is not of the form dotted.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    cfg = _set(cfg, key.split("."), text, key)
  return validate(cfg)


# -- files ----------------------------------------------------------------------------------------
def returns_transfer_config(path: str) -> bool:
  """Whether a config file's ``get_config()`` returns a ``TransferConfig`` (train.py's dispatch test)."""
  if not os.path.isfile(path):
    return False
  try:
    return isinstance(import_config_file(path).get_config(), TransferConfig)
  except Exception:  # noqa: BLE001 (not ours: config_lib.load reports the problem)
    return False


def load(path: str, overrides: Sequence[str] = (), workdir: str | None = None) -> TransferConfig:
  module = import_config_file(path, TransferConfigError)
  try:
    cfg = module.get_config()
  except (TypeError, ValueError) as e:
    raise TransferConfigError(f"config file {path!r}: bad value in get_config(): {e}") from None
  cfg = apply_overrides(validate(cfg), overrides)
  return cfg.replace(workdir=workdir) if workdir else cfg


# -- JSON -----------------------------------------------------------------------------------------
def to_dict(obj) -> Any:
  if dataclasses.is_dataclass(obj):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, Mapping):
    return {str(k): to_dict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_dict(v) for v in obj]
  return obj


def to_json(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping) and v:
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# -- stage constructors with the kind's defaults --------------------------------------------------
def align_stage(name: str = "align", **kw) -> StageConfig:
  """Stage 1 defaults: LA parameters and fusion scales train (everything else bit-identical)."""
  kw.setdefault("optim", OptimConfig(lr=1e-3, warmup_steps=10, weight_decay=0.0, trainable=ALIGN_TRAINABLE))
  return StageConfig(name=name, kind="align", **kw)


def distil_stage(name: str = "distil", **kw) -> StageConfig:
  kw.setdefault("optim", OptimConfig(lr=3e-4, warmup_steps=20, weight_decay=0.01, trainable=ALL))
  return StageConfig(name=name, kind="distil", **kw)


def long_stage(name: str = "long", **kw) -> StageConfig:
  kw.setdefault("optim", OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.01, trainable=ALL))
  kw.setdefault("ce_weight", 1.0)
  return StageConfig(name=name, kind="long", **kw)


def load_any(path: str, overrides: Sequence[str] = (), workdir: str | None = None):
  """What ``train.py --config`` runs: a ``TransferConfig`` when the file's ``get_config()`` returns one (a
  three-stage transfer), else the training ``Config`` of ``train.config_lib.load``."""
  if returns_transfer_config(path):
    return load(path, overrides, workdir)
  return config_lib.load(path, overrides, workdir)
